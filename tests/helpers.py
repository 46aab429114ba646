"""Helpers shared by the test modules (tests never import each other): tiny bases built from configs, images,
recipes, running the trainer, and comparing models. Fixtures live in conftest.py."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def tokenizer_dir() -> Path:
    from finetune.toy import toy_base_path

    return toy_base_path() / "tokenizer"


def build_tiny_sd(path: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """A random, very small SD-1-shaped pipeline (plumbing tests that need no learning)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), latent_channels=4,
        norm_num_groups=8, sample_size=32,
    )
    tok = CLIPTokenizer.from_pretrained(tokenizer_dir())
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
    ))
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=te, tokenizer=tok, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def draw_images(folder: Path, n: int = 6, caption: str = "a sks circle", size: int = 64) -> Path:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", (size, size), "white")
        ImageDraw.Draw(im).ellipse([8 + i, 8, size - 12, size - 10 + i % 3], fill=(200, 30 + 10 * i, 30))
        im.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    return folder


def cli(*args, cwd: Path = ROOT, env: dict | None = None, timeout: float = 600):
    """`python ARGS` as a person types it (a module with -m, or a tool's path), the checkout importable."""
    import os
    import subprocess
    import sys

    full = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full, capture_output=True, text=True,
                          timeout=timeout)


TOY_SMALL = ["data.sources.1.count=8", "train.checkpoint_every=0", "validation.seeds=[0]", "validation.steps=2"]


def own_pictures(folder: Path) -> dict[str, str]:
    """A newcomer's folder of 13 pictures: toy-world drawings (a red heart, so the toy base can learn it) at
    varied sizes and formats, some captioned (all saying 'sks'), one corrupt JPEG, one tiny image and one
    byte-identical duplicate. Returns {'corrupt', 'tiny', 'duplicate'}: the odd files' names."""
    import io

    from finetune.toy.world import subject_images

    folder.mkdir(parents=True, exist_ok=True)
    sizes = [(96, 96), (128, 96), (96, 160), (200, 150), (150, 200), (256, 256), (120, 120), (300, 180),
             (180, 300), (96, 128)]
    for i, ((img, caption), (w, h)) in enumerate(zip(subject_images("red_heart", len(sizes)), sizes, strict=True)):
        ext = (".jpg", ".png", ".webp")[i % 3]
        img.resize((w, h)).save(folder / f"photo_{i:02d}{ext}")
        if i % 2 == 0:
            (folder / f"photo_{i:02d}.txt").write_text(caption.replace("heart", "sks heart", 1))
    buf = io.BytesIO()
    subject_images("red_heart", 1, seed=5)[0][0].resize((160, 160)).save(buf, format="JPEG")
    (folder / "corrupt.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])  # cut off mid-scan
    subject_images("red_heart", 1, seed=6)[0][0].resize((24, 24)).save(folder / "tiny.png")
    (folder / "photo_00_copy.jpg").write_bytes((folder / "photo_00.jpg").read_bytes())
    return {"corrupt": "corrupt.jpg", "tiny": "tiny.png", "duplicate": "photo_00_copy.jpg"}


def write_recipe(tmp_path: Path, base: Path | str, images: Path, **sections) -> Path:
    """A small LoRA recipe over `images`; `sections` deep-update it (train={"max_steps": 3}, ...)."""
    from finetune.recipe import deep_merge

    data = {
        "model": {"base": str(base)},
        "data": {"sources": [{"type": "folder", "path": str(images)}], "resolution": 64,
                 "buckets": {"enabled": False}},
        "method": {"name": "lora", "rank": 4, "alpha": 2, "targets": "attention_ff"},
        "train": {"output_dir": str(tmp_path / "out"), "max_steps": 4, "batch_size": 2, "lr": 1e-3,
                  "checkpoint_every": 0, "seed": 1},
        "validation": {"prompts": [], "at_start": False},
        "export": {"formats": ["diffusers"], "model_card": False},
        "logging": {"report_to": [], "progress": False},
    }
    data = deep_merge(data, sections)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _tiny_vae(**extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), latent_channels=4,
        norm_num_groups=8, sample_size=32, **extra,
    )


def _tiny_clip_config(vocab_size: int, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, projection_dim=32, **extra)


def build_tiny_sd2(path: Path, prediction_type: str = "v_prediction", seed: int = 0) -> Path:
    """A random, very small SD-2-shaped pipeline: OpenCLIP-style text encoder (gelu, what detects SD 2.x
    in a tiny base), linear transformer projections, per-block head dims, a v-prediction scheduler."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
    )
    tok = CLIPTokenizer.from_pretrained(tokenizer_dir())
    te = CLIPTextModel(_tiny_clip_config(tok.vocab_size, hidden_act="gelu"))
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                          prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=_tiny_vae(), text_encoder=te, tokenizer=tok, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def build_tiny_sdxl(path: Path, seed: int = 0) -> Path:
    """A random, very small SDXL-shaped pipeline: two text encoders (the second with a projection),
    cross-attention over both (32 + 32 = 64), 'text_time' added conditioning (6 size/crop ids x 8 + 32
    pooled = 80), an fp16-unsafe VAE (force_upcast) and SDXL's Euler scheduler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
        use_linear_projection=True, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
    )
    tok = CLIPTokenizer.from_pretrained(tokenizer_dir())
    te = CLIPTextModel(_tiny_clip_config(tok.vocab_size))
    te2 = CLIPTextModelWithProjection(_tiny_clip_config(tok.vocab_size, hidden_act="gelu"))
    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=_tiny_vae(scaling_factor=0.13025, force_upcast=True), text_encoder=te, text_encoder_2=te2,
        tokenizer=tok, tokenizer_2=tok, scheduler=sched, force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    pipe.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------ running the trainer
def run_trainer(recipe_path: Path, *overrides: str):
    """Load a recipe (with overrides) and train it in this process; returns the Trainer."""
    from finetune.recipe import load_recipe
    from finetune.train.setup import check_output_dir, make_accelerator
    from finetune.train.trainer import Trainer

    recipe = load_recipe(recipe_path, list(overrides))
    check_output_dir(recipe)
    acc = make_accelerator(recipe)
    t = Trainer(recipe, acc)
    t.run()
    return t


CLASS_PROMPT = "a photo of a circle"


def db_recipe(tmp_path: Path, base, images: Path, num: int = 3, method=None, **sections) -> Path:
    """A tiny DreamBooth recipe: instance images + prior preservation with `num` class images."""
    from finetune.recipe import deep_merge

    data = {"sources": [{"type": "instance", "path": str(images), "instance_prompt": "a sks circle"}],
            "prior": {"class_prompt": CLASS_PROMPT, "class_dir": str(tmp_path / "class"), "num_class_images": num,
                      "generate_steps": 2, "generate_batch_size": 2, "guidance_scale": 3.0}}
    path = write_recipe(tmp_path, base, images, **deep_merge({"data": data, "train": {"lr": 1e-4}}, sections))
    recipe = yaml.safe_load(path.read_text())
    recipe["method"] = method or {"name": "full"}  # replaced, not merged into the LoRA default
    path.write_text(yaml.safe_dump(recipe))
    return path


# ------------------------------------------------------------------------------------------- comparing models
def digest(module: torch.nn.Module, skip: str = "lora_") -> str:
    """Hash of every base weight (adapter tensors excluded); peft renames wrapped weights '.base_layer.'."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if skip in name or "hada_" in name or "lokr_" in name:
            continue
        h.update(name.replace(".base_layer", "").encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def fixed_unet_output(unet, text_encoder, tokenizer) -> torch.Tensor:
    """The U-Net's prediction for fixed latents, timesteps and two captions."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    ids = tokenizer(["a sks circle", "a blue square"], padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        text = text_encoder(ids)[0]
        return unet(latents, torch.tensor([500, 250]), encoder_hidden_states=text).sample


def fresh_pipe(base: Path):
    """The stock diffusers SD pipeline of a base folder."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_comps(base: Path):
    from finetune.models.base import resolve_base
    from finetune.models.components import load_components

    return load_components(resolve_base(str(base)))


# ---------------------------------------------------------------------------------------- adapters and exports
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "conv_shortcut", "time_emb_proj"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def make_ctx(name: str = "tiny", formats=("diffusers", "kohya")):
    from finetune.export.context import ExportContext

    return ExportContext(name=name, recipe={"method": {"name": "lora"}}, method="lora", family="sd1", base="tiny",
                         base_hash="0" * 16, steps=3, resolution=64, dataset_fingerprint="f" * 16,
                         trigger_words=["sks"], formats=tuple(formats), model_card=False)


class FakeMethod:
    """What export_lora reads from a LoRAMethod: its config and the adapted module names."""

    def __init__(self, cfg, names):
        self.config, self.names = cfg, names

    def trained_modules(self):
        return list(self.names)


def randomise(module: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    """Adapters start as a no-op (LoRA B = 0, LoKr w1 = 0): give every adapter tensor random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(s in name for s in ("lora_A", "lora_B", "hada_", "lokr_")):
                p.copy_(torch.randn(p.shape, generator=g) * scale)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))


def adapted(base: Path, adapter: str = "lora", dora: bool = False, te: bool = True, rank: int = 4,
            alpha: float = 2.0, seed: int = 1, targets=None):
    """Base components with random peft adapters on the U-Net (and text encoder); returns (comps, method)."""
    from finetune.methods.lora import LoRAConfig

    cfg = LoRAConfig(adapter=adapter, use_dora=dora, rank=rank, alpha=alpha, targets=targets or UNET_TARGETS,
                     text_encoder={"enabled": te, "targets": TE_TARGETS})
    comps = load_comps(base)
    method = cfg.build()
    method.setup(comps, 1e-4)
    names = method.trained_modules()
    for i, n in enumerate(names):
        randomise(comps.named_modules()[n], seed + i)
    return comps, FakeMethod(cfg, names)


def count_adapted(module: torch.nn.Module) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(m, BaseTunerLayer) for m in module.modules())


def peft_layers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)}


# ----------------------------------------------------------------------------- same step, different layouts
TI_METHOD = {"name": "textual_inversion", "token": "<sks>", "num_vectors": 2, "initializer": "circle", "lr": 5e-2}
LAYOUT_EXPORT = {"plain": "pytorch_lora_weights.safetensors", "prior": "pytorch_lora_weights.safetensors",
                 "ti": "learned_embeds.safetensors"}


def layout_recipe(tmp_path: Path, base, kind: str, **train) -> Path:
    """A recipe whose optimizer steps are compared across layouts (one batch of 4, 2 x 2 accumulated, 2
    processes x 2): 'plain' LoRA, 'prior' LoRA with prior preservation, 'ti' Textual Inversion on empty
    captions (templates fill them). LAYOUT_EXPORT[kind] names the file to compare."""
    # Adam divides by sqrt(v) + eps: a gradient entry that sums to 1e-9 in one layout and 0 in another (float
    # order) would become a whole-lr update; eps 1e-6 keeps the comparison about the layout, not the rounding
    train = {"max_steps": 4, "max_grad_norm": None, "adam_epsilon": 1e-6, **train}
    if kind == "prior":
        return db_recipe(tmp_path, base, draw_images(tmp_path / "images", n=8), num=3, train=train,
                         method={"name": "lora", "rank": 4, "alpha": 2, "targets": "attention_ff"})
    caption = "" if kind == "ti" else "a sks circle"
    path = write_recipe(tmp_path, base, draw_images(tmp_path / "images", n=8, caption=caption), train=train)
    if kind == "ti":
        data = yaml.safe_load(path.read_text())
        data["method"] = TI_METHOD
        data["export"]["formats"] = ["diffusers"]
        path.write_text(yaml.safe_dump(data))
    return path


def max_difference(a: Path, b: Path) -> float:
    """Largest absolute difference between two safetensors files with the same keys."""
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys() and x
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def first_step_generators(seed: int, step: int, first: int, n: int) -> list:
    """The trainer's per-example generators for examples first..first+n-1 of a step of n examples (one
    process, no accumulation)."""
    from finetune.train.loss import example_generator, example_keys

    return [example_generator(k) for k in example_keys(seed, step, range(first, first + n), n)]


# ------------------------------------------------------------------------------- several processes, machines
DDP_CPU = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
# the shipped FSDP config, on 2 CPU processes in fp32 (ACCELERATE_USE_CPU makes the gloo backend)
FSDP_CPU = ["--config_file", str(ROOT / "recipes" / "accelerate" / "fsdp.yaml"), "--num_processes", "2"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_launch(recipe: Path, launcher: list[str], *overrides: str, script: Path | None = None,
                 env: dict | None = None):
    """`accelerate launch <launcher> <script> <recipe> <overrides>` in its own process group (a timeout or a
    kill takes the ranks too, not only the launcher). `--main_process_port 0` picks a free rendezvous port
    unless the launcher names one: accelerate's default 29500 would be shared by parallel runs."""
    import os
    import secrets
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher]
    if "--main_process_port" not in launcher:
        cmd += ["--main_process_port", "0"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", str(script or ROOT / "finetune" / "run.py"),
            str(recipe), *overrides]
    tag = secrets.token_hex(8)  # finds the ranks later: torchrun starts each in a session of its own
    full_env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                    FINETUNE_TEST_TAG=tag, **(env or {}))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=full_env, start_new_session=True)
    proc.tag = tag
    return proc


def finish_launch(proc, timeout: float = 600):
    """Wait for a start_launch process; on a timeout kill the launcher and every rank, and fail."""
    import subprocess

    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_launch(proc)
        out, err = proc.communicate()
        raise AssertionError(f"the launch did not finish in {timeout} s:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def survivors(proc) -> list[int]:
    """Live processes (zombies aside) of a start_launch run: the launcher and every rank it started."""
    import os

    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if f"FINETUNE_TEST_TAG={proc.tag}".encode() not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return [pid for pid in found if pid != os.getpid()]


def kill_launch(proc) -> None:
    """SIGKILL the launcher and, should any outlive it, every rank."""
    import os
    import signal

    for pid in [proc.pid, *survivors(proc)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def launch(recipe: Path, launcher: list[str], *overrides: str, timeout: float = 600, **kw):
    return finish_launch(start_launch(recipe, launcher, *overrides, **kw), timeout)


def wait_gone(proc, seconds: float = 30) -> list[int]:
    """Wait until no process of a start_launch run is left; returns those still alive after `seconds`."""
    import time

    deadline = time.monotonic() + seconds
    while (left := survivors(proc)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def one_vs_two_processes(recipe: Path, tmp_path: Path, timeout: float = 900) -> tuple[dict, dict]:
    """The LoRA of 2 processes at batch 1 (accelerate launch) and of 1 process at batch 2 (the same global batch;
    started as `python -m finetune`, which is what a one-process `accelerate launch` runs, without the launcher's
    own interpreter start)."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    done = launch(recipe, DDP_CPU, f"train.output_dir={tmp_path / 'two'}", "train.batch_size=1", timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run([sys.executable, "-m", "finetune", str(recipe), f"train.output_dir={tmp_path / 'one'}",
                           "train.batch_size=2"], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return tuple(load_file(tmp_path / n / "pytorch_lora_weights.safetensors") for n in ("two", "one"))


def killed_and_resumed(recipe: Path, tmp_path: Path, kill_after: int = 4,
                       weights: str = "pytorch_lora_weights.safetensors") -> tuple[dict, dict]:
    """The `weights` file (default: the LoRA) of a run SIGKILLed once its step-`kill_after` checkpoint is complete
    and then resumed, and of the same run uninterrupted (the recipe checkpoints at that step and trains well past
    it)."""
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    def run(*extra):
        return subprocess.run([sys.executable, "-m", "finetune", str(recipe), *extra], cwd=ROOT,
                              capture_output=True, text=True, timeout=900)

    ref = run(f"train.output_dir={tmp_path / 'ref'}")
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "finetune", str(recipe), f"train.output_dir={out}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker, deadline = out / "checkpoints" / f"step-{kill_after:06d}" / "COMPLETE", time.monotonic() + 600
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists() and not (out / weights).exists(), "killed too early or late"
    resumed = run(f"train.output_dir={out}", "train.resume=latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return load_file(out / weights), load_file(tmp_path / "ref" / weights)
