"""Wan 2.1 / 2.2 on tiny models built offline (finetune/models/tiny.py): text-to-video, image-to-video and
Wan 2.2's two experts. The loss of a batch against an independent computation with the pipelines' own helpers,
LoRA training and reloading in the stock pipelines (diffusers and ComfyUI-named files), each expert on its own
timesteps, and the resume / multi-process guarantees."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import (
    draw_images,
    first_step_generators,
    killed_and_resumed,
    one_vs_two_processes,
    write_recipe,
)

KINDS = ("t2v", "i2v", "experts")
PIPELINES = {"t2v": "WanPipeline", "i2v": "WanImageToVideoPipeline", "experts": "WanPipeline"}


@pytest.fixture(scope="session")
def wan_bases(tmp_path_factory) -> dict[str, Path]:
    from finetune.models.tiny import build_tiny_wan

    root = tmp_path_factory.mktemp("wan")
    return {k: build_tiny_wan(root / k, k) for k in KINDS}


def stock(base: Path, kind: str):
    import diffusers

    pipe = getattr(diffusers, PIPELINES[kind]).from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_recipe(tmp_path: Path, base: Path, images: Path | None = None, **sections) -> Path:
    from finetune.recipe import deep_merge

    defaults = {"model": {"max_sequence_length": 16},
                "method": {"rank": 4, "alpha": 4, "targets": "attention_ffn"},
                "export": {"formats": ["diffusers", "kohya"]},
                "train": {"max_steps": 3, "batch_size": 2, "lr": 1e-2, "seed": 5}}
    images = images or draw_images(tmp_path / "images", n=4)
    return write_recipe(tmp_path, base, images, **deep_merge(defaults, sections))


def trainer(recipe: Path, *overrides: str):
    from finetune.recipe import load_recipe
    from finetune.train.setup import make_accelerator
    from finetune.train.trainer import Trainer

    r = load_recipe(recipe, list(overrides))
    return Trainer(r, make_accelerator(r))


def test_detected_and_text_matches_the_pipeline(wan_bases):
    from finetune.models.base import resolve_base
    from finetune.models.components import LoadOptions, load_components

    captions = ["a red circle moving left", "  blue &amp; green  ", ""]
    for kind, family in (("t2v", "wan"), ("i2v", "wan_i2v"), ("experts", "wan")):
        comps = load_components(resolve_base(str(wan_bases[kind])), LoadOptions(max_sequence_length=16))
        assert comps.family.name == family
    pipe = stock(wan_bases["t2v"], "t2v")
    comps = load_components(resolve_base(str(wan_bases["t2v"])), LoadOptions(max_sequence_length=16))
    with torch.no_grad():
        ours = comps.family.encode_prompt(comps, captions, "cpu")["prompt_embeds"]
        theirs, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, max_sequence_length=16,
                                       device="cpu")
    assert torch.equal(ours, theirs)


def reference_loss(t, batch, pipe, kind: str) -> float:
    """The first step's loss written out with the pipeline's helpers: the VAE's mode normalised as the I2V
    pipeline normalises its condition, the pipeline's prompt encoding and first-frame condition
    (prepare_latents, encode_image), diffusers' timestep density on the FlowMatch grid at the sampler's shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling
    from PIL import Image

    px = batch["pixel_values"]
    clip = px if px.ndim == 5 else px.unsqueeze(2)
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    latents = (vae.encode(clip).latent_dist.mode() - mean) * inv_std
    text, _ = pipe.encode_prompt(batch["captions"], do_classifier_free_guidance=False, max_sequence_length=16,
                                 device="cpu")
    b = latents.shape[0]
    noise, u = [], []
    for g in first_step_generators(t.recipe.train.seed, 0, 0, b):
        noise.append(torch.randn(latents.shape[1:], generator=g))
        u.append(compute_density_for_timestep_sampling("logit_normal", 1, logit_mean=0.0, logit_std=1.0, generator=g))
    noise, u = torch.stack(noise), torch.cat(u)
    grid = FlowMatchEulerDiscreteScheduler(shift=pipe.scheduler.config.flow_shift).sigmas[:1000]
    window = (grid * 1000 >= 1000 * pipe.config.boundary_ratio).nonzero().flatten() if kind == "experts" else None
    first, count = (0, 1000) if window is None else (int(window[0]), len(window))
    sigmas = grid[first + (u * count).long()]
    s = sigmas.view(-1, 1, 1, 1, 1)
    hidden = (1 - s) * latents + s * noise
    image = None
    if kind == "i2v":
        frames = [Image.fromarray(((f[:, 0] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()) for f in clip]
        h, w = clip.shape[-2:]
        conds = [pipe.prepare_latents(pipe.video_processor.preprocess(f, height=h, width=w), 1, 16, h, w,
                                      clip.shape[2], torch.float32, "cpu", None, torch.zeros(1))[1] for f in frames]
        hidden = torch.cat([hidden, torch.cat(conds)], dim=1)
        image = torch.cat([pipe.encode_image(f, "cpu") for f in frames])
    pred = pipe.transformer(hidden_states=hidden, timestep=sigmas * 1000, encoder_hidden_states=text,
                            encoder_hidden_states_image=image, return_dict=False)[0]
    return float(((pred - (noise - latents)) ** 2).reshape(b, -1).mean(1).mean())


CLIPS = {"sources": [{"type": "toy_video", "count": 4}], "video": {"frames": 5, "fps": 16}}


@pytest.mark.parametrize("media", ["image", "clip"])
@pytest.mark.parametrize("kind", KINDS)
def test_batch_loss_equals_the_pipeline_helpers(tmp_path, wan_bases, kind, media):
    """Images (one-frame clips) and 5-frame toy clips (2 latent frames: the I2V condition is then the first
    frame followed by four zero frames through the causal VAE)."""
    t = trainer(wan_recipe(tmp_path, wan_bases[kind], data=CLIPS if media == "clip" else {}))
    batch = next(iter(t.data.loader(0)))
    assert batch["pixel_values"].shape[1:3] == ((3, 5) if media == "clip" else (3, 64))
    with torch.no_grad():
        loss, _ = t.compute_loss(batch)
        ref = reference_loss(t, batch, stock(wan_bases[kind], kind), kind)
    assert abs(float(loss) - ref) < 1e-6, (float(loss), ref)


def fixed_output(transformer, in_channels: int = 16, image: bool = False) -> torch.Tensor:
    """The transformer's prediction for fixed latents, text and timesteps (and CLIP image states for I2V)."""
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, in_channels, 3, 8, 8, generator=g), torch.randn(2, 7, 32, generator=g)
    img = torch.randn(2, 5, 16, generator=g) if image else None
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=torch.tensor([300.0, 900.0]), encoder_hidden_states=ctx,
                           encoder_hidden_states_image=img, return_dict=False)[0]


def outputs(pipe, kind: str) -> list[torch.Tensor]:
    i2v = kind == "i2v"
    experts = [pipe.transformer] + ([pipe.transformer_2] if getattr(pipe, "transformer_2", None) else [])
    return [fixed_output(e, 36 if i2v else 16, i2v) for e in experts]


@pytest.fixture(scope="module")
def wan_runs(tmp_path_factory, wan_bases) -> dict[str, tuple[Path, list[torch.Tensor]]]:
    """Each kind trained a few steps: its output folder and the trained experts' fixed outputs."""
    runs = {}
    for kind in KINDS:
        tmp = tmp_path_factory.mktemp(f"run_{kind}")
        t = trainer(wan_recipe(tmp, wan_bases[kind], train={"max_steps": 4}))
        t.run()
        runs[kind] = (tmp / "out", [fixed_output(e, 36 if kind == "i2v" else 16, kind == "i2v")
                                    for e in t.comps.experts.values()])
    return runs


@pytest.mark.parametrize("kind", KINDS)
def test_lora_trains_and_reloads_in_the_stock_pipeline(wan_bases, wan_runs, kind):
    out, trained = wan_runs[kind]
    before = outputs(stock(wan_bases[kind], kind), kind)
    assert all(float((a - b).abs().max()) > 1e-3 for a, b in zip(trained, before, strict=True))
    pipe = stock(wan_bases[kind], kind)
    pipe.load_lora_weights(out)
    if kind == "experts":  # the low-noise expert's file, into transformer_2
        pipe.load_lora_weights(out, weight_name="pytorch_lora_weights_low_noise.safetensors",
                               load_into_transformer_2=True)
    reloaded = outputs(pipe, kind)
    assert max(float((a - b).abs().max()) for a, b in zip(reloaded, trained, strict=True)) < 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_comfy_named_file_gives_the_same_lora_in_diffusers(wan_bases, wan_runs, kind):
    """The ComfyUI / musubi-tuner form ('lora_unet_' + original Wan names, lora_down / lora_up / alpha) read by
    diffusers' own converter for those files: the same transformers as the diffusers form."""
    from safetensors.torch import load_file

    out, trained = wan_runs[kind]
    files = ["out.safetensors"] + (["out_low_noise.safetensors"] if kind == "experts" else [])
    keys = set(load_file(out / files[0]))
    assert all(k.startswith("lora_unet_blocks_") for k in keys)
    assert "lora_unet_blocks_0_self_attn_q.alpha" in keys and "lora_unet_blocks_1_ffn_2.lora_up.weight" in keys
    if kind == "i2v":
        assert "lora_unet_blocks_0_cross_attn_k_img.lora_down.weight" in keys
    pipe = stock(wan_bases[kind], kind)
    pipe.load_lora_weights(out / files[0])
    if kind == "experts":
        pipe.load_lora_weights(out / files[1], load_into_transformer_2=True)
    reloaded = outputs(pipe, kind)
    assert max(float((a - b).abs().max()) for a, b in zip(reloaded, trained, strict=True)) < 1e-4


def test_each_expert_trains_only_on_its_own_timesteps(tmp_path, wan_bases):
    """Wan 2.2 (boundary 0.875): the high-noise expert sees only timesteps >= 875, the low-noise one only
    below; they take turns by step; training one expert never runs the other."""
    seen: dict[str, list[float]] = {}

    def watch(name):
        def hook(module, args, kwargs):
            seen.setdefault(name, []).extend(kwargs["timestep"].flatten().tolist())
        return hook

    for experts in ("all", "low_noise"):
        seen.clear()
        t = trainer(wan_recipe(tmp_path / experts, wan_bases["experts"], model={"experts": experts},
                               train={"max_steps": 6, "batch_size": 4}))
        for name, module in t.comps.experts.items():
            module.register_forward_pre_hook(watch(name), with_kwargs=True)
        t.run()
        if experts == "all":
            assert min(seen["transformer"]) >= 875 and len(seen["transformer"]) == 12
            assert max(seen["transformer_2"]) < 875 and len(seen["transformer_2"]) == 12
        else:
            assert set(seen) == {"transformer_2"} and max(seen["transformer_2"]) < 875
            assert len(set(seen["transformer_2"])) > 12  # drawn over the whole low range, not one value
            assert t.method.trained_modules() == ["transformer_2"]


def test_one_expert_exports_one_file_set(tmp_path, wan_bases):
    t = trainer(wan_recipe(tmp_path, wan_bases["experts"], model={"experts": "high_noise"}))
    t.run()
    names = {p.name for p in (tmp_path / "out").glob("*.safetensors")}
    assert names == {"pytorch_lora_weights.safetensors", "out.safetensors"}


def test_experts_on_a_one_transformer_base_is_one_line(tmp_path, wan_bases):
    import subprocess
    import sys

    from tests.helpers import ROOT

    recipe = wan_recipe(tmp_path, wan_bases["t2v"], model={"experts": "low_noise"})
    done = subprocess.run([sys.executable, "-m", "finetune", str(recipe)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "model.experts: 'low_noise' (transformer_2) is not in the base" in done.stderr.strip().splitlines()[-1]
    recipe = wan_recipe(tmp_path / "sd", ROOT / "finetune" / "toy" / "base", model={"experts": "low_noise"})
    done = subprocess.run([sys.executable, "-m", "finetune", str(recipe), "method.targets=attention"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "model.experts: 'low_noise' is not an expert of a sd1 base" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["i2v", "experts"])
def test_two_processes_match_one(tmp_path, wan_bases, kind):
    a, b = one_vs_two_processes(wan_recipe(tmp_path, wan_bases[kind], train={"max_steps": 4}), tmp_path)
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["i2v", "experts"])
def test_sigkill_then_resume_is_bit_identical(tmp_path, wan_bases, kind):
    recipe = wan_recipe(tmp_path, wan_bases[kind], train={"max_steps": 12, "checkpoint_every": 2, "batch_size": 1})
    a, b = killed_and_resumed(recipe, tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)


def test_experts_train_the_same_with_block_swap_checkpointing_and_fp8_storage(tmp_path, wan_bases):
    """Memory options on Wan 2.2's two experts: block swap (each expert's last block streamed from the CPU)
    with gradient checkpointing gives the same LoRAs as the plain run; on a base stored in fp8 the experts'
    frozen linears stay float8 and both adapters train."""
    from safetensors.torch import load_file

    runs = {}
    for name, extra in (("plain", {}), ("swap", {"block_swap": 1, "gradient_checkpointing": True})):
        t = trainer(wan_recipe(tmp_path / name, wan_bases["experts"], train={"max_steps": 4, **extra}))
        t.run()
        runs[name] = [load_file(tmp_path / name / "out" / f) for f in
                      ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_low_noise.safetensors")]
        if name == "swap":
            assert set(t.swaps) == {"transformer", "transformer_2"} and t.swap is t.swaps["transformer"]
    for a, b in zip(runs["plain"], runs["swap"], strict=True):
        assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    t = trainer(wan_recipe(tmp_path / "fp8", wan_bases["experts"], model={"quantize": "fp8"},
                           train={"max_steps": 2, "gradient_checkpointing": True}))
    t.run()
    for expert in t.comps.experts.values():
        assert expert.blocks[0].attn1.to_q.base_layer.weight.dtype == torch.float8_e4m3fn
    for f in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_low_noise.safetensors"):
        lora = load_file(tmp_path / "fp8" / "out" / f)
        assert max(float(v.abs().max()) for k, v in lora.items() if "lora_B" in k) > 1e-4


def test_tools_convert_merge_inspect_and_generate_wan(tmp_path, wan_bases, wan_runs):
    """tools/ on a Wan 2.2 run: the low-noise file converts kohya <-> diffusers exactly, `merge fuse` puts each
    expert's file into its own expert (what the stock pipeline gives with both loaded), `inspect_file` names
    the family and the expert, and `generate` writes frame strips, a GIF and one MP4 per clip."""
    import subprocess
    import sys

    import av
    from PIL import Image
    from safetensors.torch import load_file

    from tests.helpers import ROOT

    out, trained = wan_runs["experts"]
    low = out / "pytorch_lora_weights_low_noise.safetensors"

    def tool(*args):
        done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    tool("tools/convert.py", "lora", str(low), "--to", "kohya", "--out", str(tmp_path / "k.safetensors"))
    tool("tools/convert.py", "lora", str(tmp_path / "k.safetensors"), "--to", "diffusers", "--out",
         str(tmp_path / "d.safetensors"))
    a, b = load_file(low), load_file(tmp_path / "d.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    info = tool("tools/inspect_file.py", str(tmp_path / "k.safetensors"))
    assert "family: wan" in info and "finetune.expert = low_noise" in info
    tool("tools/merge.py", "fuse", "--base", str(wan_bases["experts"]), "--lora", str(out), "--lora",
         str(tmp_path / "k.safetensors"), "--out", str(tmp_path / "merged"))
    merged = outputs(stock(tmp_path / "merged", "experts"), "experts")
    assert max(float((x - y).abs().max()) for x, y in zip(merged, trained, strict=True)) < 1e-4
    tool("tools/generate.py", "a red circle moving left", "--base", str(wan_bases["experts"]), "--lora", str(out),
         "--lora", str(low), "--width", "32", "--height", "32", "--frames", "5", "--steps", "2", "--seeds", "0", "1",
         "--out", str(tmp_path / "gen.png"), "--save-images", str(tmp_path / "clips"))
    assert Image.open(tmp_path / "gen.png").size[0] >= 5 * 32 and Image.open(tmp_path / "gen.gif").n_frames == 5
    with av.open(str(tmp_path / "clips" / "p00-s1.mp4")) as clip:
        assert sum(1 for _ in clip.decode(video=0)) == 5


def test_estimate_covers_the_wan_reference_architectures(tmp_path):
    """`finetune estimate` for Wan hub bases not in the cache: the reference architectures on the meta device;
    Wan 2.2 A14B holds both 14B experts; clips' activations grow with their frames."""
    import yaml

    from finetune.memory.estimate import estimate
    from finetune.memory.skeleton import meta_components
    from finetune.models.base import resolve_base
    from finetune.recipe import load_recipe

    sizes = {}
    for base in ("Wan-AI/Wan2.1-T2V-14B-Diffusers", "Wan-AI/Wan2.2-T2V-A14B-Diffusers"):
        comps = meta_components(resolve_base(base))
        sizes[base] = {n: sum(p.numel() for p in m.parameters()) for n, m in comps.experts.items()}
        assert comps.family.name == "wan"
    assert list(sizes["Wan-AI/Wan2.2-T2V-A14B-Diffusers"]) == ["transformer", "transformer_2"]
    assert sizes["Wan-AI/Wan2.2-T2V-A14B-Diffusers"]["transformer_2"] == sizes["Wan-AI/Wan2.1-T2V-14B-Diffusers"][
        "transformer"]
    assert 14.0e9 < sizes["Wan-AI/Wan2.1-T2V-14B-Diffusers"]["transformer"] < 14.5e9
    recipe = {"model": {"base": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"},
              "data": {"sources": [{"type": "video", "path": str(tmp_path)}], "resolution": 128,
                       "video": {"frames": 9}},
              "method": {"name": "lora", "rank": 16, "targets": "attention"},
              "train": {"output_dir": str(tmp_path / "out"), "mixed_precision": "bf16"}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    peaks = {}
    for frames in (9, 33):
        est = estimate(load_recipe(tmp_path / "r.yaml", [f"data.video.frames={frames}"]), options=False)
        peaks[frames] = est.bytes_of("activations")
        weights = est.bytes_of("denoiser weights")
        assert 1.3e9 < weights / 2 < 1.5e9  # bf16: 2 bytes per parameter of the 1.3B transformer
    assert peaks[33] > 2 * peaks[9]  # 9 latent frames against 3


def test_cached_clip_latents_and_i2v_conditions_give_the_same_loss(tmp_path, wan_bases):
    """data.cache_latents on clips: the cache holds each clip's latents and its image-to-video conditions (first
    frame latents, CLIP image states) and the first step's loss is the one computed from pixels."""
    losses = {}
    for cached in (False, True):
        t = trainer(wan_recipe(tmp_path / str(cached), wan_bases["i2v"],
                               data={**CLIPS, "cache_latents": cached}))
        batch = next(iter(t.data.loader(0)))
        assert ("conditions" in batch) == cached and ("latents" in batch) == cached
        if cached:
            assert set(batch["conditions"]) == {"cond_latents", "image_embeds"}
        with torch.no_grad():
            losses[cached] = float(t.compute_loss(batch)[0])
    assert abs(losses[True] - losses[False]) < 1e-6, losses
