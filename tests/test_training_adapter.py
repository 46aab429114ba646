"""model.training_adapter: a LoRA applied to the frozen base while training, on a tiny FLUX transformer. It changes
the forward exactly as fusing it would, takes no gradient and no update, switches off and on exactly, and no file
it reads is shaped for another base."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tests.helpers import randomise

ADAPTED = ["to_q", "to_k", "to_v", "proj_mlp", "proj_out", "ff.net.0.proj", "norm1.linear"]


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory) -> Path:
    from finetune.models.tiny import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny") / "flux", guidance=False)


def transformer(base: Path):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(base / "transformer").eval().requires_grad_(False)


def flux_family():
    from finetune.models.families import FAMILIES

    return FAMILIES["flux"]


def write_lora(model, folder: Path, targets=ADAPTED, rank: int = 4, alpha: float = 8.0, seed: int = 3,
               fmt: str = "diffusers") -> Path:
    """A random LoRA over `model` written as our exports write it (diffusers file, or kohya form)."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    from finetune.export.adapters import read_adapter
    from finetune.export.lora import _config_dict, save_adapter, save_diffusers_lora

    adapted = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets),
                                      copy.deepcopy(model))
    randomise(adapted, seed)
    tensors = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(adapted).items()}
    folder.mkdir(parents=True, exist_ok=True)
    path = save_diffusers_lora(tensors, {"transformer": _config_dict(adapted.peft_config["default"])}, folder, {},
                               "lora")
    if fmt == "diffusers":
        return path
    return save_adapter(read_adapter(path, family=flux_family()), folder / "kohya.safetensors", fmt, {},
                        flux_family())


def inputs(model, batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    c = model.config
    return dict(hidden_states=torch.randn(batch, 16, c.in_channels, generator=g),
                encoder_hidden_states=torch.randn(batch, 8, c.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(batch, c.pooled_projection_dim, generator=g),
                timestep=torch.rand(batch, generator=g), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3))


def fused(model, path: Path):
    from finetune.export.adapters import fuse, read_adapter

    out = copy.deepcopy(model)
    modules = {"transformer": out}
    n = fuse(read_adapter(path, family=flux_family(), modules=modules), modules, 1.0, flux_family().kohya_names)
    assert n > 0
    return out


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_forward_is_the_fused_forward(tiny_flux, tmp_path, fmt):
    """In float64, so that the bar measures the method, not fp32 rounding (outputs near 1 round at ~1e-7)."""
    from finetune.models.training_adapter import TrainingAdapter

    base = transformer(tiny_flux)
    path = write_lora(base, tmp_path / "adapter", fmt=fmt)
    base.double()
    x = {k: v.double() for k, v in inputs(base).items()}
    with torch.no_grad():
        plain = base(**x).sample
        reference = fused(base, path)(**x).sample
        adapter = TrainingAdapter.attach(path, {"transformer": base}, flux_family())
        applied = base(**x).sample
        with adapter.off():
            off = base(**x).sample
        again = base(**x).sample
    # to_q/k/v of both blocks, the double block's ff and norm1, the single block's proj_mlp and proj_out, the last proj_out
    assert len(adapter.layers) == 11
    assert (reference - plain).abs().max() > 1e-2  # the adapter does change the output
    assert (applied - reference).abs().max() < 1e-6, (applied - reference).abs().max()
    assert torch.equal(off, plain) and torch.equal(again, applied)
    adapter.remove()
    with torch.no_grad():
        assert torch.equal(base(**x).sample, plain)


def test_no_gradient_no_update_no_parameter(tiny_flux, tmp_path):
    """Under a trained LoRA (a peft layer wrapping the hooked base layer) only the LoRA learns."""
    from peft import LoraConfig, inject_adapter_in_model

    from finetune.models.training_adapter import TrainingAdapter

    base = transformer(tiny_flux)
    path = write_lora(base, tmp_path / "adapter")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    adapter = TrainingAdapter.attach(path, {"transformer": base}, flux_family())
    factors = [t for a in adapter.layers for t in (a.up, a.down)]
    kept = [t.clone() for t in factors]
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"]), base)
    trained = [p for n, p in base.named_parameters() if "lora_" in n]
    for p in trained:
        p.requires_grad_(True)
    with torch.no_grad():
        for n, p in base.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    opt = torch.optim.AdamW(trained, lr=1e-2)
    x = inputs(base)
    with torch.no_grad():
        start = base(**x).sample
    for _ in range(3):
        loss = base(**x).sample.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is not None for p in trained)
    assert not any(t.requires_grad or t.grad is not None for t in factors)
    assert all(torch.equal(a, b) for a, b in zip(factors, kept, strict=True))
    assert not {id(t) for t in factors} & {id(p) for p in base.parameters()}
    # the base's own weights untouched, and no tensor besides them and the trained LoRA's
    state = {k.replace(".base_layer", ""): v for k, v in base.state_dict().items() if "lora_" not in k}
    assert state.keys() == before.keys() and all(torch.equal(state[k], v) for k, v in before.items())
    with torch.no_grad():
        assert (base(**x).sample - start).abs().max() > 0  # the LoRA on top did learn
        with adapter.off():
            base(**x)


def test_a_layer_the_base_lacks_or_of_another_shape_is_refused(tiny_flux, tmp_path):
    from finetune.errors import ModelError
    from finetune.models.training_adapter import TrainingAdapter

    base = transformer(tiny_flux)
    other = copy.deepcopy(base)
    other.transformer_blocks[0].attn.to_q = torch.nn.Linear(32, 48)
    path = write_lora(other, tmp_path / "other", targets=["to_q"])
    with pytest.raises(ModelError, match=r"model.training_adapter .*to_q.* does not fit the base layer \(32, 32\)"):
        TrainingAdapter.attach(path, {"transformer": base}, flux_family())
    assert not any(m._forward_hooks for m in base.modules())  # checked whole before any hook is placed


# ------------------------------------------------------------------------------------------- in a run
@pytest.fixture(scope="module")
def adapter_file(tiny_flux, tmp_path_factory) -> Path:
    """A training adapter over modules the runs below do not train (the modulation, the single blocks' MLP) and
    some they do (to_q): whatever it covers, no export may carry it."""
    return write_lora(transformer(tiny_flux), tmp_path_factory.mktemp("adapter"),
                      targets=["to_q", "proj_mlp", "norm1.linear"], seed=7)


def adapter_recipe(tmp_path, base, adapter, **sections):
    from finetune.recipe import deep_merge
    from tests.helpers import draw_images, write_recipe

    defaults = {"model": {"max_sequence_length": 16, "training_adapter": str(adapter) if adapter else None},
                "method": {"rank": 4, "alpha": 4, "targets": "attention"},
                "train": {"max_steps": 2, "lr": 1e-2, "seed": 3},
                "export": {"formats": ["diffusers", "kohya", "bfl"]}}
    return write_recipe(tmp_path, base, draw_images(tmp_path / "images", n=4), **deep_merge(defaults, sections))


def losses(out: Path) -> list[float]:
    return [float(line.split(",")[1]) for line in (out / "logs" / "loss.csv").read_text().splitlines()[1:]]


def exported(out: Path) -> dict[str, set[str]]:
    from safetensors import safe_open

    files = {}
    for path in sorted(out.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            files[path.name] = set(f.keys())
    return files


def test_a_run_through_the_adapter_exports_only_what_it_trained(tmp_path, tiny_flux, adapter_file):
    from tests.helpers import run_trainer

    plain = run_trainer(adapter_recipe(tmp_path / "plain", tiny_flux, None))
    through = run_trainer(adapter_recipe(tmp_path / "through", tiny_flux, adapter_file))
    assert through.training_adapter is not None and len(through.training_adapter.layers) > 0
    assert losses(plain.out) != losses(through.out)  # the adapter is in the forward
    a, b = exported(plain.out), exported(through.out)
    assert a.keys() == b.keys() == {"pytorch_lora_weights.safetensors", "out.safetensors", "out_bfl.safetensors"}
    assert a == b  # the same files and keys as without it: only the trained LoRA
    assert not [k for keys in b.values() for k in keys if "proj_mlp" in k or "norm1" in k or "mlp" in k]


def test_a_full_finetune_through_the_adapter_exports_the_base_weights(tmp_path, tiny_flux, adapter_file):
    """`full` trains the base layers the adapter hooks: the export holds those weights, never W + adapter."""
    import yaml
    from safetensors.torch import load_file

    from tests.helpers import run_trainer

    path = adapter_recipe(tmp_path, tiny_flux, adapter_file, train={"max_steps": 1, "lr": 1e-9})
    data = yaml.safe_load(path.read_text())
    data["method"], data["export"]["formats"] = {"name": "full"}, ["diffusers"]
    path.write_text(yaml.safe_dump(data))
    t = run_trainer(path)
    saved = load_file(next((t.out / "model" / "transformer").glob("*.safetensors")))
    original = transformer(tiny_flux).state_dict()
    assert saved.keys() == original.keys()
    assert max(float((saved[k].float() - original[k].float()).abs().max()) for k in saved) < 1e-5


def test_preservation_holds_to_the_base_with_the_adapter(tmp_path, tiny_flux, adapter_file):
    """The base's prediction (adapters off) is the base as trained through: with the adapter, not without."""
    from finetune.train.preserve import base_predictions
    from tests.helpers import draw_images

    images = draw_images(tmp_path / "world", n=4, caption="a red square")
    t = trainer(adapter_recipe(tmp_path, tiny_flux, adapter_file, data={
        "sources": [{"type": "folder", "path": str(tmp_path / "images")},
                    {"type": "folder", "path": str(images), "preserve": True}],
        "preservation": {"share": 0.5, "weight": 1.0}}))
    latents = t.encode_latents(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    example = t.objective.example(latents, [torch.Generator().manual_seed(i) for i in range(2)])
    text = t.encode_text(["a red square", ""])
    batch = {"captions": ["a red square", ""]}
    with torch.no_grad():
        mine = t.comps.family.predict(t.comps.denoiser, example.noisy, example.timesteps, text, batch)  # LoRA B = 0
        held = base_predictions(t, example, text, batch, [0, 1], [True, True])
        with t.training_adapter.off():
            without = base_predictions(t, example, text, batch, [0, 1], [True, True])
    assert (held - mine).abs().max() < 1e-5
    assert (without - mine).abs().max() > 1e-3


def trainer(recipe: Path):
    from finetune.recipe import load_recipe
    from finetune.train.setup import make_accelerator
    from finetune.train.trainer import Trainer

    r = load_recipe(recipe)
    return Trainer(r, make_accelerator(r))


@pytest.mark.parametrize("quantize", ["nf4", "fp8"])
def test_quantized_and_block_swapped_bases_train_through_it(tmp_path, tiny_flux, adapter_file, quantize):
    """On a quantized base the adapter hooks the quantized layers; block swap streams their weights and gives
    the same run as without it."""
    from tests.helpers import run_trainer

    swap = {"gradient_checkpointing": True}
    plain = run_trainer(adapter_recipe(tmp_path / "plain", tiny_flux, adapter_file, model={"quantize": quantize},
                                       train=swap))
    swapped = run_trainer(adapter_recipe(tmp_path / "swap", tiny_flux, adapter_file, model={"quantize": quantize},
                                         train={**swap, "block_swap": 1} if quantize == "fp8" else swap))
    hooked = {type(a.layer).__name__ for a in swapped.training_adapter.layers}
    assert hooked & {"Linear4bit", "Linear"}, hooked
    a, b = losses(plain.out), losses(swapped.out)
    assert all(torch.isfinite(torch.tensor(a))) and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5
    assert exported(swapped.out)["pytorch_lora_weights.safetensors"] == exported(plain.out)[
        "pytorch_lora_weights.safetensors"]


def test_validation_shows_the_grids_with_and_without_it(tmp_path, tiny_flux, adapter_file):
    import numpy as np
    from PIL import Image

    from tests.helpers import run_trainer

    t = run_trainer(adapter_recipe(tmp_path, tiny_flux, adapter_file, train={"max_steps": 1},
                                   validation={"prompts": ["a sks circle"], "seeds": [0], "at_start": False,
                                               "training_adapter": "both"}))
    without = np.asarray(Image.open(t.out / "samples" / "step-000001.png"), np.float32)
    with_it = np.asarray(Image.open(t.out / "samples" / "step-000001_with_adapter.png"), np.float32)
    cells = slice(28, 28 + 64), slice(0, 64)  # below the title and the prompt label: the one sample
    assert np.abs(without[cells] - with_it[cells]).max() > 10
