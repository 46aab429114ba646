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
    from finetune.models.family import FAMILIES

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
