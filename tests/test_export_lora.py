"""LoRA-family files: the kohya/LyCORIS file means the same as peft's adapter, and loads in diffusers exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.export.adapters import delta, factors_delta, read_adapter
from finetune.export.lora import export_lora
from tests.helpers import adapted, count_adapted, fresh_pipe, make_ctx, peft_layers
from tests.helpers import fixed_unet_output as unet_out


def canon(component: str, path: str, family: str = "sd1") -> str:
    """The adapter-layer name of a model module (text encoders keep CLIP's `text_model.` level)."""
    from finetune.models.families import FAMILIES

    return f"{component}.{FAMILIES[family].kohya_names[component].canonical(path)}"


@pytest.fixture(scope="module")
def lora_run(tiny_base, tmp_path_factory):
    """U-Net + text-encoder LoRA, alpha != rank, every U-Net target kind (attention, ff, proj, conv, emb)."""
    comps, method = adapted(tiny_base, rank=4, alpha=2.0)
    out = tmp_path_factory.mktemp("lora")
    written = export_lora(comps, method, out, make_ctx())
    ref = unet_out(comps.unet, comps.text_encoder, comps.tokenizer)
    return comps, out, written, ref


def test_kohya_file_loads_in_diffusers_to_the_same_output(tiny_base, lora_run):
    comps, out, _, ref = lora_run
    pipe = fresh_pipe(tiny_base)
    base_out = unet_out(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    pipe.load_lora_weights(str(out / "tiny.safetensors"))
    assert count_adapted(pipe.unet) == count_adapted(comps.unet) > 0
    assert count_adapted(pipe.text_encoder) == count_adapted(comps.text_encoder) > 0
    got = unet_out(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    assert (ref - base_out).abs().max() > 1e-2  # the adapter really changes the output
    assert (got - ref).abs().max() < 1e-4


def test_diffusers_file_keeps_alpha_and_every_module(tiny_base, lora_run):
    comps, out, _, ref = lora_run
    pipe = fresh_pipe(tiny_base)
    pipe.load_lora_weights(str(out))
    assert count_adapted(pipe.unet) == count_adapted(comps.unet)
    assert count_adapted(pipe.text_encoder) == count_adapted(comps.text_encoder)
    assert (unet_out(pipe.unet, pipe.text_encoder, pipe.tokenizer) - ref).abs().max() < 1e-4


def test_metadata_carries_the_story(lora_run):
    from finetune.export.io import read_metadata

    _, out, _, _ = lora_run
    meta = read_metadata(out / "tiny.safetensors")
    for key in ("finetune.base_model", "finetune.base_model_hash", "finetune.family", "finetune.method",
                "finetune.rank", "finetune.alpha", "finetune.targets", "finetune.trigger_words", "finetune.steps",
                "finetune.dataset_fingerprint", "finetune.recipe", "ss_network_dim", "ss_network_alpha",
                "ss_base_model_version", "modelspec.architecture", "modelspec.trigger_phrase"):
        assert meta.get(key), key
    assert meta["ss_network_alpha"] == "2.0" and meta["ss_network_dim"] == "4"


def _peft_delta(layer) -> torch.Tensor:
    return layer.get_delta_weight("default").float()


@pytest.mark.parametrize("adapter", ["loha", "lokr"])
def test_lycoris_formula_rebuilds_peft_delta(tiny_base, tmp_path, adapter):
    """Reconstruct every layer's delta from the kohya file with the LyCORIS/ComfyUI formula; compare to peft."""
    comps, method = adapted(tiny_base, adapter=adapter, rank=4, alpha=3.0, te=True)
    export_lora(comps, method, tmp_path, make_ctx())
    kohya = read_adapter(tmp_path / "tiny.safetensors")
    assert kohya.format == "kohya" and kohya.kind == adapter
    worst, n = 0.0, 0
    for component in ("unet", "text_encoder"):
        for path, layer in peft_layers(comps.named_modules()[component]).items():
            entry = kohya.layers[canon(component, path)]
            weight = layer.get_base_layer().weight
            got = _lycoris_delta(entry, weight.shape)
            worst = max(worst, (got - _peft_delta(layer)).abs().max().item())
            n += 1
    assert n == len(kohya.layers) > 20
    assert worst < 1e-5


def _lycoris_delta(entry, shape) -> torch.Tensor:
    """ComfyUI/A1111 semantics written out: scale = alpha / dim of the decomposed factor, else 1."""
    t = entry.tensors
    if entry.kind == "loha":
        dim = t["hada_w1_b"].shape[0]
        d = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        return (d * entry.alpha / dim).reshape(shape)
    dim = None
    w1 = t.get("lokr_w1")
    if w1 is None:
        dim, w1 = t["lokr_w1_b"].shape[0], t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t.get("lokr_w2")
    if w2 is None:
        dim, w2 = t["lokr_w2_b"].shape[0], t["lokr_w2_a"] @ t["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    scale = entry.alpha / dim if dim else 1.0
    return (torch.kron(w1, w2) * scale).reshape(shape)


def _peft_merged(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(base weight, weight after peft merges the adapter) of one peft layer."""
    w = layer.get_base_layer().weight.float().clone()
    layer.merge(adapter_names=["default"])
    merged = layer.get_base_layer().weight.float().clone()
    layer.unmerge()
    return w, merged


def test_dora_math_matches_peft_and_kohya_is_refused(tiny_base, tmp_path):
    """The diffusers DoRA file rebuilds peft's merged weights (m * (W + dW) / ||W + dW||_row); a kohya DoRA
    file is refused in one line, because neither UI applies it exactly. Measured here with their formulas
    re-derived (A1111: norm over input columns of W + dW; ComfyUI, per-row magnitude: norm of W alone)."""
    from finetune.errors import ModelError

    comps, method = adapted(tiny_base, dora=True, rank=4, alpha=8.0, te=True)
    export_lora(comps, method, tmp_path, make_ctx(formats=("diffusers",)))
    ours = read_adapter(tmp_path)
    worst, a1111, comfy = 0.0, [], []
    for component in ("unet", "text_encoder"):
        for path, layer in peft_layers(comps.named_modules()[component]).items():
            entry = ours.layers[canon(component, path)]
            w, merged = _peft_merged(layer)
            worst = max(worst, (w + delta(entry, w) - merged).abs().max().item())
            dw = factors_delta(entry, w.shape)
            m = entry.tensors["lora_magnitude_vector"].float().reshape(-1, *([1] * (w.dim() - 1)))
            new = w + dw
            col = new.transpose(0, 1).reshape(new.shape[1], -1).norm(dim=1).reshape(1, -1, *([1] * (w.dim() - 2)))
            row = w.reshape(w.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (w.dim() - 1)))
            change = (merged - w).norm()
            a1111.append(((new * m / col - merged).norm() / change).item())
            comfy.append(((new * m / row - merged).norm() / change).item())
    assert worst < 1e-5
    a1111_err, comfy_err = sum(a1111) / len(a1111), sum(comfy) / len(comfy)
    print(f"mean relative error of the applied change: A1111 {a1111_err:.3f}, ComfyUI {comfy_err:.4f}")
    assert a1111_err > 0.2 and comfy_err > 0.005  # why kohya DoRA is refused
    with pytest.raises(ModelError, match=r"^trained adapter: layer '[^']+': DoRA layers cannot be written in kohya"):
        export_lora(comps, method, tmp_path / "k", make_ctx(formats=("kohya",)))
    assert not (tmp_path / "k" / "tiny.safetensors").exists()


def _lycoris_dora_file(comps, path: Path, column: bool = False) -> Path:
    """A kohya DoRA file as LyCORIS writes it (dora_scale per output row, [out, 1, ...]; or, `column`, per
    input column as AUTOMATIC1111's convention)."""
    from safetensors.torch import save_file

    from finetune.export.adapters import peft_layers as read_layers
    from finetune.export.kohya import layers_to_kohya
    from finetune.export.layouts import bound_names
    from finetune.export.lora import adapter_states

    tensors, configs = adapter_states(comps, ["unet", "text_encoder"])
    layers = read_layers(tensors, configs, "peft")
    names = bound_names(comps.family.kohya_names, comps.named_modules())
    out = {}
    for name, layer in layers.items():
        m = layer.tensors.pop("lora_magnitude_vector")
        component, module = name.split(".", 1)
        stem = names[component].key(module)
        out |= layers_to_kohya({name: layer}, names)
        n_in = layer.tensors["lora_A.weight"].shape[1]
        out[f"{stem}.dora_scale"] = (torch.ones(1, n_in) if column else
                                     m.reshape(m.numel(), *([1] * (layer.tensors["lora_B.weight"].dim() - 1))))
    save_file({k: v.detach().contiguous() for k, v in out.items()}, path)
    return path


def test_lycoris_dora_file_converts_to_diffusers_exactly(tiny_base, tmp_path):
    """A kohya DoRA file from LyCORIS (per-row magnitude) reads exactly and converts to a diffusers file that
    stock diffusers loads to the trained output (text encoder too, under transformers' magnitude name); a
    per-column magnitude, which peft cannot hold, is refused in one line."""
    from finetune.errors import ModelError
    from finetune.export.convert import convert_lora

    comps, method = adapted(tiny_base, dora=True, rank=4, alpha=8.0, te=True)
    ref = unet_out(comps.unet, comps.text_encoder, comps.tokenizer)
    src = _lycoris_dora_file(comps, tmp_path / "lycoris.safetensors")
    out = convert_lora(src, tmp_path / "back", "diffusers")
    pipe = fresh_pipe(tiny_base)
    pipe.load_lora_weights(str(out))
    assert count_adapted(pipe.unet) == count_adapted(comps.unet)
    assert count_adapted(pipe.text_encoder) == count_adapted(comps.text_encoder)
    assert (unet_out(pipe.unet, pipe.text_encoder, pipe.tokenizer) - ref).abs().max() < 1e-4
    column = _lycoris_dora_file(comps, tmp_path / "column.safetensors", column=True)
    with pytest.raises(ModelError, match="per input column"):
        read_adapter(column)


def test_factors_delta_matches_peft_for_lora(lora_run):
    comps, out, _, _ = lora_run
    adapter = read_adapter(out)
    assert adapter.format == "diffusers"
    worst = 0.0
    for path, layer in peft_layers(comps.unet).items():
        d = factors_delta(adapter.layers[f"unet.{path}"], layer.get_base_layer().weight.shape)
        worst = max(worst, (d - _peft_delta(layer)).abs().max().item())
    assert worst < 1e-6
