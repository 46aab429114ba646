"""Speed features give the same training as without them: the optimizer stepped inside the backward,
regional compile, attention backends, block swap's streaming, token routing off."""

from __future__ import annotations

import pytest

from tests.helpers import max_difference, run_trainer, write_recipe

LORA = "pytorch_lora_weights.safetensors"


def _losses(out) -> list[str]:
    return [line.split(",")[1] for line in (out / "logs" / "loss.csv").read_text().splitlines()[1:]]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_optimizer_in_backward_is_the_ordinary_step(tmp_path, tiny_base, images, accumulation):
    """Each tensor stepped from its gradient hook: the same weights and losses, bit for bit, as one step over
    all tensors after the backward (AdamW's fused kernel works element by element), with accumulation too."""
    recipe = write_recipe(tmp_path, tiny_base, images, train={
        "max_steps": 3, "max_grad_norm": None, "gradient_accumulation": accumulation, "batch_size": 1,
        "lr_scheduler": "linear", "warmup_steps": 1})
    outs = {}
    for on in (False, True):
        out = tmp_path / f"in_backward_{on}"
        t = run_trainer(recipe, f"train.output_dir={out}", f"train.optimizer_in_backward={str(on).lower()}")
        assert (t.in_backward is not None) == on
        outs[on] = out
    assert max_difference(outs[False] / LORA, outs[True] / LORA) == 0.0
    assert _losses(outs[False]) == _losses(outs[True])


@pytest.mark.parametrize("setting, key", [
    ("train.max_grad_norm=1.0", "train.max_grad_norm"),
    ("train.mixed_precision=fp16", "train.mixed_precision"),
    ("train.on_nan=skip", "train.on_nan"),
])
def test_optimizer_in_backward_refuses_what_cannot_be_exact(tmp_path, tiny_base, images, setting, key):
    from finetune.errors import UserError
    from finetune.recipe import load_recipe

    recipe = write_recipe(tmp_path, tiny_base, images, train={"max_grad_norm": None})
    with pytest.raises(UserError) as e:
        load_recipe(recipe, ["train.optimizer_in_backward=true", setting])
    line = str(e.value)
    assert "train.optimizer_in_backward" in line and key in line and "\n" not in line.strip()


def test_optimizer_in_backward_lowers_the_step_peak():
    """A full fine-tune of the tiny FLUX: the gradients of tensors already stepped are gone before the
    backward ends (live tensor bytes counted from the tensors themselves, finetune/memory/step.py)."""
    from finetune.memory.step import step_peaks
    from finetune.recipe import validate

    recipe = validate({
        "model": {"base": "toy-flux", "max_sequence_length": 32},
        "data": {"sources": [{"type": "toy", "subject": "world", "count": 4}], "resolution": 64,
                 "buckets": {"enabled": False}},
        "method": {"name": "full"}, "train": {"batch_size": 1, "max_grad_norm": None},
        "validation": {"prompts": [], "at_start": False},
    })
    peaks = step_peaks(recipe, device="cpu")
    assert peaks["in_backward"] < peaks["ordinary"] - 0.1 * peaks["gradient_bytes"], peaks


# ------------------------------------------------------------------------------------------ regional compile
def _bucketed_images(folder):
    """Six images in three aspect buckets: the blocks see three shapes of image tokens."""
    from PIL import Image

    folder.mkdir(parents=True)
    for i, size in enumerate([(64, 64), (128, 64), (64, 128)] * 2):
        Image.new("RGB", size, (40 * i, 120, 200 - 30 * i)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a sks thing")
    return folder


def _flux_recipe(tmp_path, images, **train):
    return write_recipe(tmp_path, "toy-flux", images, model={"max_sequence_length": 32},
                        data={"buckets": {"enabled": True}},
                        method={"name": "lora", "rank": 4, "alpha": 4, "targets": "attention_mlp"},
                        train={"max_steps": 4, "batch_size": 1, "max_grad_norm": None, **train})


@pytest.fixture()
def eager_compile(monkeypatch):
    """Dynamo's graphs and guards without code generation (inductor's C++ build takes minutes on a CPU)."""
    import finetune.train.compile as compile_module

    monkeypatch.setattr(compile_module, "BACKEND", "eager")


def test_regional_compile_is_the_same_run_and_compiles_each_block_kind_once(tmp_path, eager_compile):
    """FLUX's 2 double- and 4 single-stream blocks: at most two graphs per block kind (the first block's input
    needs no gradient, the rest do), all in the first step, none for later buckets; the same run as eager."""
    from finetune.train.compile import compiled_blocks

    recipe = _flux_recipe(tmp_path, _bucketed_images(tmp_path / "images"))
    plain = run_trainer(recipe, f"train.output_dir={tmp_path / 'plain'}")
    t = run_trainer(recipe, f"train.output_dir={tmp_path / 'blocks'}", "train.compile=blocks")
    assert len(compiled_blocks(t.comps.denoiser, t.comps.family)) == 6
    steps = t.compile_watch.per_step
    assert len(steps) == 4 and 2 <= steps[0] <= 4 and steps[1:] == [0, 0, 0], steps
    assert max_difference(plain.out / LORA, t.out / LORA) == 0.0
    assert _losses(plain.out) == _losses(t.out)


@pytest.mark.parametrize("quantize", ["none", "fp8"])
def test_regional_compile_with_block_swap_checkpointing_and_quantized_base(tmp_path, eager_compile, quantize):
    """The blocks' forwards are compiled, block swap's hooks and the checkpoint wrapper stay outside them."""
    recipe = _flux_recipe(tmp_path, _bucketed_images(tmp_path / "images"), gradient_checkpointing=True,
                          block_swap=2)
    runs = [run_trainer(recipe, f"train.output_dir={tmp_path / str(c)}", f"train.compile={c}",
                        f"model.quantize={quantize}") for c in ("false", "blocks")]
    assert runs[1].swap is not None and runs[1].swap.loads == runs[0].swap.loads
    assert runs[1].compile_watch.per_step[1:] == [0, 0, 0]
    assert max_difference(runs[0].out / LORA, runs[1].out / LORA) == 0.0


def test_regional_compile_of_a_unet(tmp_path, tiny_base, images, eager_compile):
    """U-Nets: the family's down, middle and up blocks, one shape per step (no buckets): no recompiles."""
    recipe = write_recipe(tmp_path, tiny_base, images, train={"max_steps": 3, "max_grad_norm": None})
    plain = run_trainer(recipe, f"train.output_dir={tmp_path / 'plain'}")
    t = run_trainer(recipe, f"train.output_dir={tmp_path / 'blocks'}", "train.compile=blocks")
    assert t.compile_watch.per_step[0] > 0 and t.compile_watch.per_step[1:] == [0, 0]
    assert max_difference(plain.out / LORA, t.out / LORA) < 1e-6


def test_compile_refusals(tmp_path, images):
    from finetune.errors import UserError
    from finetune.recipe import load_recipe

    recipe = write_recipe(tmp_path, "toy-flux", images, model={"max_sequence_length": 32},
                          method={"targets": "attention"})
    with pytest.raises(UserError, match="train.compile: blocks") as e:
        load_recipe(recipe, ["train.compile=true", "train.block_swap=2", "train.gradient_checkpointing=true"])
    assert "\n" not in str(e.value).strip()
    load_recipe(recipe, ["train.compile=blocks", "train.block_swap=2", "train.gradient_checkpointing=true"])


@pytest.mark.slow
def test_regional_compile_with_inductor_trains_the_same(tmp_path):
    """The real backend (C++ code generation on a CPU: minutes): the same LoRA to float tolerance."""
    recipe = _flux_recipe(tmp_path, _bucketed_images(tmp_path / "images"), max_steps=3)
    plain = run_trainer(recipe, f"train.output_dir={tmp_path / 'plain'}")
    t = run_trainer(recipe, f"train.output_dir={tmp_path / 'blocks'}", "train.compile=blocks")
    assert t.compile_watch.per_step[1:] == [0, 0]
    assert max_difference(plain.out / LORA, t.out / LORA) < 1e-5


# ------------------------------------------------------------------------------------------ attention backends
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("kind", ["native", "eager", "flex"])
def test_attention_backends_compute_the_same(kind):
    """Through diffusers' dispatcher: the FLUX toy's processors carry the backend (the process-wide active
    backend stays as it was); the SD toy's U-Net gets the dispatching processor. Outputs agree with SDPA."""
    import torch
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    from finetune.models.attention import BACKENDS, DispatchAttnProcessor, set_attention
    from finetune.toy import toy_base_path, toy_flux_base_path

    before = _AttentionBackendRegistry.get_active_backend()[0]
    unet = UNet2DConditionModel.from_pretrained(toy_base_path() / "unet")
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500]), torch.randn(2, 77, 64, generator=g))
    outs = {}
    for k in ("sdpa", kind):
        set_attention(unet, k)
        with torch.no_grad():
            outs[k] = unet(*args).sample
    if kind == "flex":
        assert all(isinstance(p, DispatchAttnProcessor) for p in unet.attn_processors.values())
    assert (outs[kind] - outs["sdpa"]).abs().max() < 1e-5

    flux = FluxTransformer2DModel.from_pretrained(toy_flux_base_path() / "transformer")
    n = 64
    inputs = dict(hidden_states=torch.randn(1, n, 16, generator=g), timestep=torch.tensor([0.5]),
                  encoder_hidden_states=torch.randn(1, 8, 64, generator=g), pooled_projections=torch.ones(1, 64),
                  img_ids=torch.zeros(n, 3), txt_ids=torch.zeros(8, 3), return_dict=False)
    for k in ("sdpa", kind):
        set_attention(flux, k)
        assert {p._attention_backend.value for p in flux.attn_processors.values()} == {BACKENDS[k]}
        with torch.no_grad():
            outs[k] = flux(**inputs)[0]
    assert (outs[kind] - outs["sdpa"]).abs().max() < 1e-5
    assert _AttentionBackendRegistry.get_active_backend()[0] == before


@pytest.mark.parametrize("kind, install", [("flash", "pip install flash-attn"), ("sage", "pip install sageattention"),
                                           ("flash3", "FlashAttention 3")])
def test_missing_attention_package_is_one_line(tmp_path, tiny_base, images, kind, install, monkeypatch):
    import finetune.sections as sections
    from finetune.errors import RecipeError
    from finetune.recipe import load_recipe

    monkeypatch.setattr(sections, "_installed", lambda package: False)
    with pytest.raises(RecipeError, match=f"model.attention: '{kind}' needs the") as e:
        load_recipe(write_recipe(tmp_path, tiny_base, images), [f"model.attention={kind}"])
    assert install in str(e.value) and "\n" not in str(e.value)


def test_gpu_only_attention_on_a_cpu_run_is_one_line(tmp_path, tiny_base, images):
    from finetune.errors import ModelError

    recipe = write_recipe(tmp_path, tiny_base, images)
    with pytest.raises(ModelError, match="model.attention: cudnn runs on NVIDIA GPUs only") as e:
        run_trainer(recipe, "model.attention=cudnn")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_attention_backend_is_recorded_in_the_export(tmp_path, tiny_base, images):
    import json

    from safetensors import safe_open

    t = run_trainer(write_recipe(tmp_path, tiny_base, images, train={"max_steps": 1}), "model.attention=eager")
    with safe_open(t.out / LORA, "pt") as f:
        recipe = json.loads(f.metadata()["finetune.recipe"])
    assert recipe["model"]["attention"] == "eager"


# ------------------------------------------------------------------------------------------ token routing
def _router_trainer(tmp_path, images, name, **train):
    from finetune.recipe import load_recipe
    from finetune.train.setup import make_accelerator
    from finetune.train.trainer import Trainer

    recipe = load_recipe(_flux_recipe(tmp_path, images, max_steps=3, batch_size=2, **train),
                         [f"train.output_dir={tmp_path / name}"])
    return Trainer(recipe, make_accelerator(recipe))


def test_token_routing_keeping_every_token_is_the_plain_run(tmp_path):
    """The gather and the skip connection are exact: with nothing dropped the run is bit for bit the plain one."""
    images = _bucketed_images(tmp_path / "images")
    plain = run_trainer(_flux_recipe(tmp_path, images, max_steps=3, batch_size=2), f"train.output_dir={tmp_path / 'p'}")
    t = _router_trainer(tmp_path, images, "r", routing={"first_block": 1, "last_block": 4})
    t.router.drop = 0.0
    t.run()
    assert max_difference(plain.out / LORA, t.out / LORA) == 0.0


@pytest.mark.parametrize("checkpointing", [False, True])
def test_token_routing_sends_half_the_image_tokens_through_the_window(tmp_path, checkpointing):
    """Blocks 1-4 of the toy's 6 see half the image tokens in training forwards (their recomputation under
    checkpointing too, with the same tokens: the same run as without), every token elsewhere and when sampling."""
    import torch

    images = _bucketed_images(tmp_path / "images")
    seen: dict[int, list[tuple[int, bool]]] = {}
    runs = {}
    for ckpt in sorted({False, checkpointing}):
        t = _router_trainer(tmp_path, images, f"r{ckpt}", routing={"first_block": 1, "last_block": 4},
                            gradient_checkpointing=ckpt)
        blocks = list(t.comps.denoiser.transformer_blocks) + list(t.comps.denoiser.single_transformer_blocks)

        def watch(i):
            def hook(block, args, kwargs):
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                seen.setdefault(i, []).append((hidden.shape[1], torch.is_grad_enabled()))
            return hook

        if ckpt == checkpointing:
            for i, block in enumerate(blocks):  # after the router's hook: sees what the block computes on
                block.register_forward_pre_hook(watch(i), with_kwargs=True)
        t.run()
        runs[ckpt] = t
    full = {n for n, _ in seen[0]}
    assert all(n in full for i in (0, 5) for n, _ in seen[i])
    routed = [n for i in (1, 2, 3, 4) for n, grad in seen[i] if grad]
    assert routed and all(2 * n in full or 2 * n - 1 in full or 2 * n + 1 in full for n in routed), (routed, full)
    if checkpointing:
        assert max_difference(runs[False].out / LORA, runs[True].out / LORA) < 1e-6


def test_token_routing_is_refused_where_blocks_do_not_route(tmp_path, tiny_base, images):
    from finetune.errors import UserError
    from finetune.recipe import load_recipe

    with pytest.raises(UserError, match="train.routing") as e:
        load_recipe(write_recipe(tmp_path, tiny_base, images), ["train.routing={drop_ratio: 0.5}"])
    assert "\n" not in str(e.value).strip()
