"""Control training on a tiny FLUX.1 base built offline: `control_lora` (a widened input projection for the control
latents, channel-concatenated as FluxControlPipeline does): a batch's loss against the stock pipeline's own helpers,
the LoRA export reloaded in a stock FluxControlPipeline giving the trained model's images, the recipe's rules,
2 processes = 1, and SIGKILL + resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.edit_families import flow_draw, pairs
from tests.helpers import killed_and_resumed, one_vs_two_processes, run_trainer, write_recipe


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from finetune.models.tiny import build_tiny

    return build_tiny("flux", tmp_path_factory.mktemp("flux") / "flux")


def recipe(tmp_path: Path, base: Path, **sections) -> Path:
    from finetune.recipe import deep_merge

    defaults = {"model": {"max_sequence_length": 32},
                "data": {"conditioning": {"count": 1, "role": "spatial"}},
                "method": {"name": "control_lora", "rank": 4, "alpha": 2, "targets": "attention"},
                "train": {"max_steps": 3, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 0, "seed": 5}}
    method = sections.pop("method") if sections.get("method", {}).get("name", "control_lora") != "control_lora" \
        else None
    path = write_recipe(tmp_path, base, pairs(tmp_path / "pairs", 1), **deep_merge(defaults, sections))
    if method is not None:  # another method, with its own keys only
        path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "method": method}))
    return path


def trainer(path: Path, *overrides: str):
    from finetune.recipe import load_recipe
    from finetune.train.setup import make_accelerator
    from finetune.train.trainer import Trainer

    r = load_recipe(path, list(overrides))
    return Trainer(r, make_accelerator(r))


def stock(base: Path):
    from diffusers import FluxControlPipeline

    pipe = FluxControlPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_parts(pipe, batch, draw, max_sequence_length: int) -> dict:
    """A batch as a FLUX.1 control pipeline prepares it: the target's and the control image's latents (its VAE
    encoding) packed, the noisy target, the ids, the encoded prompt."""
    px, control = batch["pixel_values"], batch["reference_pixels"][0]
    b, _, height, width = px.shape

    def encode(x):
        z = pipe.vae.encode(x).latent_dist.mode()
        return (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor

    latents = encode(px)
    noisy, sigmas = draw(latents)
    c, h, w = noisy.shape[1:]
    embeds, pooled, text_ids = pipe.encode_prompt(batch["captions"], None, device="cpu",
                                                  max_sequence_length=max_sequence_length)
    return {"latents": latents, "size": (height, width), "noisy": pipe._pack_latents(noisy, b, c, h, w),
            "control": pipe._pack_latents(encode(control), b, c, h, w),
            "call": {"timestep": sigmas, "guidance": torch.ones(b), "pooled_projections": pooled,
                     "encoder_hidden_states": embeds, "txt_ids": text_ids, "return_dict": False,
                     "img_ids": pipe._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)}}


def control_prediction(pipe, batch, draw, max_sequence_length: int):
    """(clean target latents, prediction) as FluxControlPipeline computes them for a batch: the control's packed
    latents concatenated with the target's on the feature axis. The pipeline's transformer is widened first as
    diffusers' loader widens it for a Control LoRA (zero columns)."""
    p = flux_parts(pipe, batch, draw, max_sequence_length)
    out = pipe.transformer(hidden_states=torch.cat([p["noisy"], p["control"]], 2), **p["call"])[0]
    return p["latents"], pipe._unpack_latents(out, *p["size"], pipe.vae_scale_factor)


def widened(pipe, lora: dict | None = None):
    """The stock pipeline with its input projection widened by diffusers' own loader code path."""
    x = pipe.transformer.x_embedder
    shapes = lora or {"transformer.x_embedder.lora_A.weight": torch.zeros(1, 2 * x.in_features),
                      "transformer.x_embedder.lora_B.weight": torch.zeros(x.out_features, 1)}
    pipe._maybe_expand_transformer_param_shape_or_error_(pipe.transformer, shapes)
    return pipe


def test_the_widened_base_predicts_what_the_base_does(base):
    """Zero new columns: before training, the control image changes nothing."""
    from finetune.models.families import FAMILIES

    pipe = stock(base)
    t = pipe.transformer
    x = torch.randn(1, 16, t.config.in_channels)
    kw = {"timestep": torch.tensor([0.5]), "guidance": torch.ones(1), "pooled_projections": torch.randn(1, 16),
          "encoder_hidden_states": torch.randn(1, 4, 32), "txt_ids": torch.zeros(4, 3), "img_ids": torch.zeros(16, 3),
          "return_dict": False}
    with torch.no_grad():
        before = t(hidden_states=x, **kw)[0]
        assert FAMILIES["flux_control"].widen_input(t) == "x_embedder"
        after = t(hidden_states=torch.cat([x, torch.randn_like(x)], 2), **kw)[0]
    assert t.config.in_channels == 2 * x.shape[2] and torch.equal(before, after)


@pytest.mark.parametrize("cached", [False, True])
def test_batch_loss_equals_the_stock_control_pipelines_own_computation(tmp_path, base, cached):

    flow = {"timestep_sampling": "uniform", "resolution_shift": False}
    t = trainer(recipe(tmp_path, base, train={"flow": flow}, data={"cache_text": cached}))
    assert t.comps.family.name == "flux_control" and t.comps.denoiser.x_embedder.in_features == 128
    batch = next(iter(t.data.loader(0)))
    pipe = widened(stock(base))
    # the trained LoRA starts at zero: put the same nonzero weights in both so the control path is exercised
    with torch.no_grad():
        w = torch.randn_like(pipe.transformer.x_embedder.weight) * 0.1
        pipe.transformer.x_embedder.weight.copy_(w)
        t.comps.denoiser.x_embedder.base_layer.weight.copy_(w)
        loss, _ = t.compute_loss(batch)
        b = batch["pixel_values"].shape[0]
        drawn = {}
        draw = flow_draw(t, b, drawn)

        latents, pred = control_prediction(pipe, batch, draw, 32)
        ref = ((pred - (drawn["noise"] - latents)) ** 2).reshape(b, -1).mean(1).mean()
    assert abs(float(loss) - float(ref)) < 1e-6, (float(loss), float(ref))


def _render(pipe, image, seed: int = 0, **kw):
    return pipe(prompt="red", control_image=image, height=64, width=64, num_inference_steps=2,
                generator=torch.Generator().manual_seed(seed), output_type="np", **kw).images[0]


@pytest.fixture(scope="module")
def run(base, tmp_path_factory):
    folder = tmp_path_factory.mktemp("control_run")
    return run_trainer(recipe(folder, base, train={"lr": 5e-2}), "logging.progress=false")


def test_the_export_in_a_stock_control_pipeline_gives_the_trained_models_images(base, run):
    from PIL import Image
    from safetensors.torch import load_file

    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    ours = _render(run.comps.pipeline(edit=True), image)
    other = _render(run.comps.pipeline(edit=True), Image.fromarray(255 - np.asarray(image)))
    lora = load_file(Path(run.recipe.train.output_dir) / "pytorch_lora_weights.safetensors")
    assert lora["transformer.x_embedder.lora_A.weight"].shape[1] == 128  # the widened input, in the file
    pipe = stock(base)
    pipe.load_lora_weights(Path(run.recipe.train.output_dir))
    loaded = _render(pipe, image)
    assert pipe.transformer.config.in_channels == 128
    assert np.abs(ours - other).max() > 1e-3  # the control image steers the trained model ...
    assert np.abs(loaded - ours).max() < 1e-4, np.abs(loaded - ours).max()  # ... and the export holds it


def test_only_the_lora_trains_and_the_new_columns_stay_zero(run):
    x = run.comps.denoiser.x_embedder
    assert not x.base_layer.weight.requires_grad and x.base_layer.weight.shape[1] == 128
    assert torch.count_nonzero(x.base_layer.weight[:, 64:]) == 0
    assert float(x.lora_B["default"].weight.detach().abs().max()) > 0  # the control path trained through the LoRA
    assert all("lora" in n for n in run.params)


@pytest.mark.parametrize(("sections", "words"), [
    ({"data": {"conditioning": None}}, "data.conditioning"),
    ({"data": {"conditioning": {"count": 1, "role": "reference"}}}, "role: spatial"),
    ({"export": {"formats": ["kohya"]}}, "export.formats"),
])
def test_recipe_rules(tmp_path, base, sections, words):
    from finetune.recipe import load_recipe

    with pytest.raises(Exception, match=words) as e:
        load_recipe(recipe(tmp_path, base, **sections), [])
    assert "Traceback" not in str(e.value)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, base):
    two, one = one_vs_two_processes(recipe(tmp_path, base), tmp_path)
    assert max(float((two[k] - one[k]).abs().max()) for k in one) < 1e-6


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path, base):
    path = recipe(tmp_path, base, train={"max_steps": 8, "checkpoint_every": 4})
    resumed, ref = killed_and_resumed(path, tmp_path)
    assert resumed.keys() == ref.keys() and all(torch.equal(resumed[k], ref[k]) for k in ref)


# ------------------------------------------------------------------------------------------- controlnet (FLUX)
CONTROLNET = {"method": {"name": "controlnet"}, "export": {"formats": ["diffusers", "single_file"]}}


def controlnet_prediction(pipe, batch, draw, max_sequence_length: int):
    """(clean target latents, prediction) as FluxControlNetPipeline computes them: the control image encoded and
    packed like the target, the ControlNet on the transformer's inputs, its residuals into the transformer."""
    p = flux_parts(pipe, batch, draw, max_sequence_length)
    blocks, singles = pipe.controlnet(hidden_states=p["noisy"], controlnet_cond=p["control"], controlnet_mode=None,
                                      conditioning_scale=1.0, **p["call"])
    out = pipe.transformer(hidden_states=p["noisy"], controlnet_block_samples=blocks,
                           controlnet_single_block_samples=singles, **p["call"])[0]
    return p["latents"], pipe._unpack_latents(out, *p["size"], pipe.vae_scale_factor)


def test_the_controlnet_starts_from_the_bases_blocks_and_changes_nothing(tmp_path, base):
    t = trainer(recipe(tmp_path, base, **CONTROLNET))
    net, tr = t.comps.added["controlnet"], t.comps.denoiser
    assert t.comps.family.name == "flux_controlnet"
    assert torch.equal(net.transformer_blocks[0].attn.to_q.weight, tr.transformer_blocks[0].attn.to_q.weight)
    assert torch.count_nonzero(net.controlnet_x_embedder.weight) == 0
    assert not any(p.requires_grad for p in tr.parameters()) and all(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("cached", [False, True])
def test_controlnet_loss_equals_the_stock_pipelines_own_computation(tmp_path, base, cached):
    from diffusers import FluxControlNetPipeline

    flow = {"timestep_sampling": "uniform", "resolution_shift": False}
    t = trainer(recipe(tmp_path, base, train={"flow": flow}, data={"cache_text": cached}, **CONTROLNET))
    batch = next(iter(t.data.loader(0)))
    net = t.comps.added["controlnet"]
    with torch.no_grad():  # the zero-initialised outputs made nonzero, so the ControlNet's path counts
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    pipe = FluxControlNetPipeline.from_pretrained(base, controlnet=net)
    with torch.no_grad():
        loss, _ = t.compute_loss(batch)
        b = batch["pixel_values"].shape[0]
        drawn = {}
        draw = flow_draw(t, b, drawn)

        latents, pred = controlnet_prediction(pipe, batch, draw, 32)
        ref = ((pred - (drawn["noise"] - latents)) ** 2).reshape(b, -1).mean(1).mean()
        base_pred = controlnet_prediction(stock_controlnet(base, zero=net), batch, draw, 32)[1]
    assert abs(float(loss) - float(ref)) < 1e-6, (float(loss), float(ref))
    assert float((base_pred - pred).abs().max()) > 1e-3  # the ControlNet's path mattered


def stock_controlnet(base: Path, folder: Path | None = None, zero=None):
    """A stock FluxControlNetPipeline with the ControlNet from `folder`, or one shaped like `zero` with zero
    residual outputs (the base's own prediction)."""
    from diffusers import FluxControlNetModel, FluxControlNetPipeline

    if folder is not None:
        net = FluxControlNetModel.from_pretrained(folder)
    else:
        net = FluxControlNetModel.from_config(zero.config)
        for blocks in (net.controlnet_blocks, net.controlnet_single_blocks):
            for m in blocks:
                torch.nn.init.zeros_(m.weight), torch.nn.init.zeros_(m.bias)
    pipe = FluxControlNetPipeline.from_pretrained(base, controlnet=net)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def controlnet_run(base, tmp_path_factory):
    folder = tmp_path_factory.mktemp("controlnet_run")
    return run_trainer(recipe(folder, base, train={"lr": 1e-2}, **CONTROLNET), "logging.progress=false")


def test_the_controlnet_exports_load_in_the_stock_pipeline_and_give_the_trained_models_images(base, controlnet_run):
    from PIL import Image
    from safetensors.torch import load_file

    run = controlnet_run
    out = Path(run.recipe.train.output_dir)
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    ours = _render(run.comps.pipeline(edit=True), image)
    other = _render(run.comps.pipeline(edit=True), Image.fromarray(255 - np.asarray(image)))
    loaded = _render(stock_controlnet(base, out / "controlnet"), image)
    assert np.abs(ours - other).max() > 1e-3  # the control image steers the trained model ...
    assert np.abs(loaded - ours).max() < 1e-4, np.abs(loaded - ours).max()  # ... and the export holds it
    folder = load_file(out / "controlnet" / "diffusion_pytorch_model.safetensors")
    single = load_file(out / f"{out.name}_controlnet.safetensors")
    assert "controlnet_x_embedder.weight" in single  # what ComfyUI's loader recognises a FLUX ControlNet by
    assert single.keys() == folder.keys() and all(torch.equal(single[k], folder[k]) for k in folder)


@pytest.mark.slow
def test_controlnet_sigkill_then_resume_is_bit_identical(tmp_path, base):
    path = recipe(tmp_path, base, train={"max_steps": 8, "checkpoint_every": 4}, **CONTROLNET)
    resumed, ref = killed_and_resumed(path, tmp_path, weights="controlnet/diffusion_pytorch_model.safetensors")
    assert resumed.keys() == ref.keys() and all(torch.equal(resumed[k], ref[k]) for k in ref)


# ------------------------------------------------------------------------------- controlnet (SD 1.x and SDXL)
UNETS = {"sd1": ("tiny_base", "StableDiffusionControlNetPipeline"),
         "sdxl": ("tiny_sdxl_base", "StableDiffusionXLControlNetPipeline")}


def unet_recipe(tmp_path: Path, base: Path, **sections) -> Path:
    return recipe(tmp_path, base, model={"max_sequence_length": None}, **CONTROLNET, **sections)


def unet_controlnet_prediction(pipe, batch, noise, steps, xl: bool):
    """(clean latents, prediction) as Stable Diffusion (XL)'s ControlNet pipeline loop computes them: its prompt
    (and SDXL's size/crop conditioning), its control image processor, the ControlNet's residuals into the U-Net."""
    from diffusers import DDPMScheduler

    px = batch["pixel_values"]
    b = px.shape[0]
    latents = pipe.vae.encode(px).latent_dist.mode() * pipe.vae.config.scaling_factor
    noisy = DDPMScheduler.from_config(pipe.scheduler.config).add_noise(latents, noise, steps)
    if xl:
        embeds, _, pooled, _ = pipe.encode_prompt(batch["captions"], device="cpu", do_classifier_free_guidance=False)
        ids = torch.cat([pipe._get_add_time_ids(tuple(batch["original_size"][i].tolist()),
                                                tuple(batch["crop_top_left"][i].tolist()),
                                                tuple(batch["target_size"][i].tolist()), torch.float32,
                                                text_encoder_projection_dim=pooled.shape[1]) for i in range(b)])
        extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
    else:
        embeds, _ = pipe.encode_prompt(batch["captions"], "cpu", 1, False)
        extra = {}
    pil = [Image.fromarray(((c.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
           for c in batch["reference_pixels"][0]]
    image = pipe.control_image_processor.preprocess(pil, height=px.shape[2], width=px.shape[3])
    down, mid = pipe.controlnet(noisy, steps, encoder_hidden_states=embeds, controlnet_cond=image,
                                conditioning_scale=1.0, guess_mode=False, return_dict=False, **extra)
    pred = pipe.unet(noisy, steps, encoder_hidden_states=embeds, return_dict=False, **extra,
                     down_block_additional_residuals=down, mid_block_additional_residual=mid)[0]
    return latents, pred


@pytest.mark.parametrize("name", list(UNETS))
def test_unet_controlnet_loss_equals_the_stock_pipelines_own_computation(tmp_path, request, name):
    import diffusers

    from finetune.train.loss import ddpm_draws
    from tests.helpers import first_step_generators

    fixture, pipeline = UNETS[name]
    base = request.getfixturevalue(fixture)
    t = trainer(unet_recipe(tmp_path, base))
    assert t.comps.family.name == f"{name}_controlnet"
    batch = next(iter(t.data.loader(0)))
    net = t.comps.added["controlnet"]
    with torch.no_grad():  # the zero-initialised residuals made nonzero, so the ControlNet's path counts
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    pipe = getattr(diffusers, pipeline).from_pretrained(base, controlnet=net, safety_checker=None,
                                                        requires_safety_checker=False)
    with torch.no_grad():
        loss, _ = t.compute_loss(batch)
        b = batch["pixel_values"].shape[0]
        shape = (b, 4, 16, 16)
        noise, steps = ddpm_draws(torch.zeros(shape), 1000, first_step_generators(t.recipe.train.seed, 0, 0, b), 0.0)
        latents, pred = unet_controlnet_prediction(pipe, batch, noise, steps, xl=name == "sdxl")
        target = noise if t.comps.prediction_type == "epsilon" else pipe.scheduler.get_velocity(latents, noise, steps)
        ref = ((pred - target) ** 2).reshape(b, -1).mean(1).mean()
    assert abs(float(loss) - float(ref)) < 1e-6, (float(loss), float(ref))


@pytest.fixture(scope="module")
def unet_runs(tmp_path_factory):
    from tests.helpers import build_tiny_sd, build_tiny_sdxl

    made = {}

    def get(name: str):
        if name not in made:
            folder = tmp_path_factory.mktemp(f"{name}_controlnet_run")
            base = (build_tiny_sdxl if name == "sdxl" else build_tiny_sd)(folder / "base")
            made[name] = base, run_trainer(unet_recipe(folder, base, train={"lr": 1e-1}), "logging.progress=false")
        return made[name]

    return get


@pytest.mark.parametrize("name", list(UNETS))
def test_the_unet_controlnet_exports_load_in_the_stock_pipeline(unet_runs, name):
    import diffusers
    from diffusers import ControlNetModel
    from safetensors.torch import load_file

    base, run = unet_runs(name)
    out = Path(run.recipe.train.output_dir)
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8))

    def render(pipe, control):
        pipe.set_progress_bar_config(disable=True)
        return pipe(prompt="red", image=control, height=64, width=64, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), output_type="np").images[0]

    pipe = getattr(diffusers, UNETS[name][1]).from_pretrained(
        base, controlnet=ControlNetModel.from_pretrained(out / "controlnet"), safety_checker=None,
        requires_safety_checker=False)
    loaded = render(pipe, image)
    ours = render(run.comps.pipeline(edit=True, scheduler=pipe.scheduler), image)  # the base's sampler
    other = render(run.comps.pipeline(edit=True, scheduler=pipe.scheduler), Image.fromarray(255 - np.asarray(image)))
    assert np.abs(ours - other).max() > 1e-3  # the control image steers the trained model ...
    assert np.abs(loaded - ours).max() < 1e-4, np.abs(loaded - ours).max()  # ... and the export holds it
    single = load_file(out / f"{out.name}_controlnet.safetensors")
    assert "controlnet_cond_embedding.conv_in.weight" in single  # ComfyUI's sign of a diffusers-form ControlNet


def test_a_unet_controlnet_refuses_cached_latents(tmp_path, tiny_sdxl_base):
    from finetune.recipe import load_recipe

    with pytest.raises(Exception, match="data.cache_latents"):
        load_recipe(unet_recipe(tmp_path, tiny_sdxl_base, data={"cache_latents": True}), [])


# ------------------------------------------------------------------------- tools/generate.py --image (control)
def _generated(tmp_path: Path, name: str, *argv) -> np.ndarray:
    """tools/generate.py's one image (seed 0, 2 steps, 64 px) for `argv`, as saved (0..255)."""
    from tests.test_tools_export import run_tool

    assert run_tool("generate", "red", *argv, "--steps", 2, "--seeds", 0, "--width", 64, "--height", 64,
                    "--save-images", tmp_path / name, "--out", tmp_path / f"{name}.png") == 0
    return np.asarray(Image.open(tmp_path / name / "p00-s0.png"), dtype=np.float32)


def _png_close(saved: np.ndarray, stock: np.ndarray) -> float:
    """Largest difference of a saved image from a stock pipeline's float output, on the saved 0..255 scale."""
    return float(np.abs(saved - (stock * 255).round()).max())


def test_generate_image_drives_the_stock_control_pipeline_for_a_control_lora(tmp_path, base, run):
    """A Control LoRA given to tools/generate.py with --image: told by its shapes, the base widened, the LoRA fused,
    FluxControlPipeline run: the image the stock pipeline's own loader gives (to the PNG's rounding)."""
    out = Path(run.recipe.train.output_dir)
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    image.save(tmp_path / "control.png")
    Image.fromarray(255 - np.asarray(image)).save(tmp_path / "other.png")
    args = ("--base", base, "--lora", out, "--guidance", 3.5)
    ours = _generated(tmp_path, "a", *args, "--image", tmp_path / "control.png")
    other = _generated(tmp_path, "b", *args, "--image", tmp_path / "other.png")
    pipe = stock(base)
    pipe.load_lora_weights(out)
    assert _png_close(ours, _render(pipe, image, guidance_scale=3.5)) <= 1.0
    assert np.abs(ours - other).max() >= 1.0  # the control image steers it


@pytest.mark.parametrize("name", ["flux", "sd1"])
def test_generate_image_drives_the_stock_controlnet_pipeline(tmp_path, base, controlnet_run, unet_runs, name):
    """--controlnet RUN --image CONTROL: the family's stock ControlNet pipeline with the exported ControlNet."""
    import diffusers
    from diffusers import ControlNetModel

    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    image.save(tmp_path / "control.png")
    if name == "flux":
        folder = Path(controlnet_run.recipe.train.output_dir)
        extra = ("--guidance", 3.5)
        expected = _render(stock_controlnet(base, folder / "controlnet"), image, guidance_scale=3.5)
    else:
        base, run = unet_runs(name)
        folder = Path(run.recipe.train.output_dir)
        extra = ("--scheduler", "base", "--guidance", 3.0)
        pipe = getattr(diffusers, UNETS[name][1]).from_pretrained(
            base, controlnet=ControlNetModel.from_pretrained(folder / "controlnet"), safety_checker=None,
            requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        expected = pipe(prompt="red", image=image, height=64, width=64, num_inference_steps=2, guidance_scale=3.0,
                        generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    ours = _generated(tmp_path, "a", "--base", base, "--controlnet", folder, "--image", tmp_path / "control.png",
                      *extra)
    assert _png_close(ours, expected) <= 1.0


def test_generate_refuses_a_controlnet_it_cannot_use(tmp_path, base, run, controlnet_run, capsys):
    from tests.test_tools_export import run_tool

    Image.new("RGB", (64, 64), "white").save(tmp_path / "c.png")
    lora, flux_net = Path(run.recipe.train.output_dir), Path(controlnet_run.recipe.train.output_dir)
    cases = [(("--base", base, "--controlnet", lora, "--image", tmp_path / "c.png"), "no diffusers ControlNet here"),
             (("--base", base, "--controlnet", flux_net), "give one --image"),
             (("--base", base, "--lora", lora), "a Control LoRA; give its control image with --image")]
    for argv, words in cases:
        assert run_tool("generate", "red", *argv, "--max-sequence-length", 32, "--out", tmp_path / "o.png") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err


def test_train_norm_layers_trains_the_qk_norms_and_every_loader_applies_them(tmp_path, base):
    """method.train_norm_layers (diffusers' --train_norm_layers): the attention's q/k norm scales train whole, are
    checkpointed with the LoRA, go into its file, and both the stock FluxControlPipeline loader and
    tools/generate.py (our reader, fused) give the trained model's images."""
    from safetensors.torch import load_file

    t = run_trainer(recipe(tmp_path, base, method={"name": "control_lora", "rank": 4, "alpha": 2,
                                                   "targets": "attention", "train_norm_layers": True},
                           train={"lr": 5e-2}), "logging.progress=false")
    norms = [n for n in t.params if ".norm_" in n]
    assert norms and all(n.endswith(".weight") and ("lora" in n or ".norm_" in n) for n in t.params)
    out = Path(t.recipe.train.output_dir)
    saved = load_file(out / "pytorch_lora_weights.safetensors")
    key = "transformer.transformer_blocks.0.attn.norm_q.weight"
    pipe = stock(base)
    base_norms = {k: v.clone() for k, v in pipe.transformer.state_dict().items() if ".norm_" in k}
    assert key in saved and float((saved[key] - base_norms[key[12:]]).abs().max()) > 1e-3  # trained
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    ours = _render(t.comps.pipeline(edit=True), image, guidance_scale=3.5)
    pipe.load_lora_weights(out)
    assert np.abs(_render(pipe, image, guidance_scale=3.5) - ours).max() < 1e-4
    pipe.transformer.load_state_dict(base_norms, strict=False)  # the LoRA without its norms: another model
    assert np.abs(_render(pipe, image, guidance_scale=3.5) - ours).max() > 1e-3
    image.save(tmp_path / "control.png")
    generated = _generated(tmp_path, "g", "--base", base, "--lora", out, "--image", tmp_path / "control.png",
                           "--guidance", 3.5)
    assert _png_close(generated, ours) <= 1.0
    from finetune.errors import ModelError
    from finetune.export.adapters import read_adapter
    from finetune.export.lora import save_adapter

    with pytest.raises(ModelError, match="no place for"):  # a layout without the norms refuses, never drops them
        save_adapter(read_adapter(out), tmp_path / "k.safetensors", "kohya", {})
