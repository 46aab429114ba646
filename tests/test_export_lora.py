"""LoRA-family files: the kohya/LyCORIS file means the same as peft's adapter, and loads in diffusers exactly."""

from __future__ import annotations

import pytest
import torch

from finetune.export.adapters import delta, factors_delta, read_adapter
from finetune.export.lora import export_lora
from tests.helpers import adapted, count_adapted, fresh_pipe, make_ctx, peft_layers
from tests.helpers import fixed_unet_output as unet_out


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
            entry = kohya.layers[f"{component}.{path}"]
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


def test_dora_kohya_magnitude_layout_and_math(tiny_base, tmp_path):
    """dora_scale is [out, 1(, 1, 1)]; m * (W + dW) / ||W + dW||_row rebuilds peft's DoRA weight."""
    from safetensors.torch import load_file

    comps, method = adapted(tiny_base, dora=True, rank=4, alpha=8.0, te=True)
    export_lora(comps, method, tmp_path, make_ctx())
    raw = load_file(tmp_path / "tiny.safetensors")
    scales = {k: v for k, v in raw.items() if k.endswith(".dora_scale")}
    assert scales and all(v.shape[1:] == (1,) * (v.dim() - 1) for v in scales.values())
    kohya = read_adapter(tmp_path / "tiny.safetensors")
    worst = 0.0
    for component in ("unet", "text_encoder"):
        for path, layer in peft_layers(comps.named_modules()[component]).items():
            w = layer.get_base_layer().weight.float()
            layer.merge(adapter_names=["default"])
            merged = layer.get_base_layer().weight.float().clone()
            layer.unmerge()
            worst = max(worst, (w + delta(kohya.layers[f"{component}.{path}"], w) - merged).abs().max().item())
    assert worst < 1e-5


def test_dora_kohya_converted_back_loads_in_diffusers(tiny_base, tmp_path):
    """diffusers drops dora_scale from kohya SD files; our kohya -> diffusers conversion keeps DoRA exact.

    Text encoder too: its magnitude is written as '...lora_magnitude_vector.weight', the name transformers keeps.
    """
    from finetune.export.convert import convert_lora

    comps, method = adapted(tiny_base, dora=True, rank=4, alpha=8.0, te=True)
    export_lora(comps, method, tmp_path, make_ctx(formats=("kohya",)))
    ref = unet_out(comps.unet, comps.text_encoder, comps.tokenizer)
    out = convert_lora(tmp_path / "tiny.safetensors", tmp_path / "back", "diffusers")
    pipe = fresh_pipe(tiny_base)
    pipe.load_lora_weights(str(out))
    assert count_adapted(pipe.unet) == count_adapted(comps.unet)
    assert count_adapted(pipe.text_encoder) == count_adapted(comps.text_encoder)
    assert (unet_out(pipe.unet, pipe.text_encoder, pipe.tokenizer) - ref).abs().max() < 1e-4


def test_factors_delta_matches_peft_for_lora(lora_run):
    comps, out, _, _ = lora_run
    adapter = read_adapter(out)
    assert adapter.format == "diffusers"
    worst = 0.0
    for path, layer in peft_layers(comps.unet).items():
        d = factors_delta(adapter.layers[f"unet.{path}"], layer.get_base_layer().weight.shape)
        worst = max(worst, (d - _peft_delta(layer)).abs().max().item())
    assert worst < 1e-6
