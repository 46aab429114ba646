"""QLoRA on a tiny FLUX transformer: nf4 and int8 bases (bitsandbytes' CPU kernels) train only the adapter,
the loss falls, and the exported LoRA loads on the full-precision base in a stock FluxPipeline, where it changes the output
as it changed the quantized training model's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, draw_images, write_recipe

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory) -> Path:
    from finetune.models.tiny import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny") / "flux")


STEPS, WINDOW = 24, 8  # the loss of one step depends on its timesteps: compare averages of 8 steps


def losses(out: Path) -> list[float]:
    return [float(line.split(",")[1]) for line in (out / "logs" / "loss.csv").read_text().splitlines()[1:]]


def qlora_trainer(tmp_path: Path, base: Path, kind: str, **train):
    from finetune.recipe import load_recipe
    from finetune.train.setup import make_accelerator
    from finetune.train.trainer import Trainer

    path = write_recipe(tmp_path, base, draw_images(tmp_path / "images", n=4),
                        model={"quantize": kind, "max_sequence_length": 16},
                        method={"rank": 4, "alpha": 4, "targets": "attention_mlp"},
                        train={"max_steps": STEPS, "lr": 1e-2, "seed": 3, **train})
    recipe = load_recipe(path)
    return Trainer(recipe, make_accelerator(recipe))


def flux_output(transformer) -> torch.Tensor:
    """The transformer's prediction for fixed packed latents, text and timesteps."""
    from diffusers import FluxPipeline

    g = torch.Generator().manual_seed(0)
    x, ctx, pooled = torch.randn(2, 16, 64, generator=g), torch.randn(2, 8, 32, generator=g), torch.randn(2, 16, generator=g)
    with torch.no_grad():
        return transformer(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled,
                           timestep=torch.tensor([0.3, 0.8]), guidance=torch.ones(2), txt_ids=torch.zeros(8, 3),
                           img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32),
                           return_dict=False)[0]


LAYERS = {"nf4": "Linear4bit", "int8": "Linear8bitLt"}


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_qlora_trains_only_the_adapter_and_exports_for_the_full_base(tmp_path, tiny_flux, kind):
    from diffusers import FluxPipeline

    t = qlora_trainer(tmp_path, tiny_flux, kind)
    den = t.comps.denoiser
    q = den.transformer_blocks[0].attn.to_q
    assert type(q.base_layer).__name__ == LAYERS[kind]  # peft's bitsandbytes LoRA layer over the quantized one
    packed = {n: p.detach().clone() for n, p in den.named_parameters() if not p.requires_grad}
    assert q.base_layer.weight.dtype == (torch.uint8 if kind == "nf4" else torch.int8)
    assert {p.dtype for p in den.parameters() if p.requires_grad} == {torch.float32}
    t.run()
    # frozen bytes untouched (quantized weights, norms, embeddings); the adapter moved
    assert all(torch.equal(p, packed[n]) for n, p in den.named_parameters() if not p.requires_grad)
    assert float(q.lora_B["default"].weight.detach().abs().max()) > 1e-3
    # it learns: the same 4 images for 24 steps; the last 8 steps' mean loss well under the first 8 steps'
    loss = losses(tmp_path / "out")
    first, last = sum(loss[:WINDOW]) / WINDOW, sum(loss[-WINDOW:]) / WINDOW
    print(f"{kind}: mean loss of steps 1-{WINDOW} {first:.4f}, of the last {WINDOW} {last:.4f}")
    assert len(loss) == STEPS and last < 0.95 * first

    quant_lora = flux_output(den)
    den.disable_adapters()
    quant_base = flux_output(den)
    den.enable_adapters()
    full = FluxPipeline.from_pretrained(tiny_flux).transformer
    full_base = flux_output(full)
    pipe = FluxPipeline.from_pretrained(tiny_flux)  # the unquantized base in stock diffusers
    pipe.load_lora_weights(tmp_path / "out")
    full_lora = flux_output(pipe.transformer)

    lora_effect = float((full_lora - full_base).abs().max())
    quant_error = float((quant_base - full_base).abs().max())
    gap = float((full_lora - quant_lora).abs().max())
    delta_gap = float(((full_lora - full_base) - (quant_lora - quant_base)).abs().max())
    print(f"{kind}: LoRA effect {lora_effect:.4f}, quantization error {quant_error:.4f}, "
          f"full+LoRA vs quantized+LoRA {gap:.4f}, difference of the LoRA's effect {delta_gap:.4f}")
    assert lora_effect > 0.05  # the file carries what was trained, and stock diffusers applies it
    assert gap < quant_error + 0.25 * lora_effect  # the only difference left is the base's quantization
    assert delta_gap < 0.25 * lora_effect  # the adapter does the same thing on either base

    # tools/merge.py fuses the adapter into the full-precision base: a plain fp32 FLUX folder whose output is
    # the full base with the LoRA applied
    merged = tmp_path / "merged"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "merge.py"), "fuse", "--base", str(tiny_flux),
                           "--lora", str(tmp_path / "out" / "pytorch_lora_weights.safetensors"), "--out", str(merged)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    fused = FluxPipeline.from_pretrained(merged).transformer
    layers = {type(m).__name__ for m in fused.modules()}
    assert "Linear" in layers and LAYERS[kind] not in layers
    assert {p.dtype for p in fused.parameters()} == {torch.float32}
    fused_gap = float((flux_output(fused) - full_lora).abs().max())
    print(f"{kind}: merged full-precision base vs full base + LoRA {fused_gap:.2e}")
    assert fused_gap < 1e-4


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory) -> Path:
    from finetune.models.tiny import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("tiny") / "sd3")


def sd3_output(transformer) -> torch.Tensor:
    """The SD3 transformer's prediction for fixed latents, text and timesteps."""
    g = torch.Generator().manual_seed(0)
    x, ctx, pooled = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 8, 32, generator=g), torch.randn(2, 32, generator=g)
    with torch.no_grad():
        return transformer(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled,
                           timestep=torch.tensor([300.0, 800.0]), return_dict=False)[0]


def stored_form(layer, kind: str, x: torch.Tensor) -> None:
    """The frozen weight is held quantized, and the layer computes in the compute dtype (fp32 here)."""
    if kind == "fp8":  # stored as float8, upcast for the matmul: exactly F.linear with the fp8 values in fp32
        assert layer.weight.dtype == torch.float8_e4m3fn  # (diffusers' layerwise casting stores the bias so too)
        bias = None if layer.bias is None else layer.bias.float()
        expected = torch.nn.functional.linear(x, layer.weight.float(), bias)
        with torch.no_grad():
            got = layer(x)
        assert got.dtype == torch.float32 and torch.equal(got, expected)
        assert layer.weight.dtype == torch.float8_e4m3fn  # back to storage after the forward
    else:
        assert type(layer).__name__ == LAYERS[kind]
        assert layer.weight.dtype == (torch.uint8 if kind == "nf4" else torch.int8)


@pytest.mark.parametrize(("family", "kind"), [("sd3", "nf4"), ("flux", "fp8")])
def test_quantized_base_trains_and_exports_for_the_full_base(tmp_path, request, family, kind):
    """SD3 on an nf4 base and FLUX with fp8 storage (diffusers' layerwise casting): the adapter trains, the
    frozen weights keep their stored form, and the LoRA loads on the full-precision base in stock diffusers."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    base = request.getfixturevalue(f"tiny_{family}")
    pipeline, output = {"sd3": (StableDiffusion3Pipeline, sd3_output), "flux": (FluxPipeline, flux_output)}[family]
    t = qlora_trainer(tmp_path, base, kind, max_steps=8)
    den = t.comps.denoiser
    q = den.transformer_blocks[0].attn.to_q
    stored_form(q.base_layer, kind, torch.randn(3, q.base_layer.in_features))
    packed = {n: p.detach().clone() for n, p in den.named_parameters() if not p.requires_grad}
    assert {p.dtype for p in den.parameters() if p.requires_grad} == {torch.float32}
    t.run()
    assert all(torch.equal(p, packed[n]) for n, p in den.named_parameters() if not p.requires_grad)
    stored_form(q.base_layer, kind, torch.randn(3, q.base_layer.in_features))

    quant_lora = output(den)
    den.disable_adapters()
    quant_base = output(den)
    den.enable_adapters()
    full_base = output(pipeline.from_pretrained(base).transformer)
    pipe = pipeline.from_pretrained(base)  # the unquantized base in stock diffusers
    pipe.load_lora_weights(tmp_path / "out")
    full_lora = output(pipe.transformer)
    lora_effect = float((full_lora - full_base).abs().max())
    quant_error = float((quant_base - full_base).abs().max())
    gap = float((full_lora - quant_lora).abs().max())
    delta_gap = float(((full_lora - full_base) - (quant_lora - quant_base)).abs().max())
    print(f"{family} {kind}: LoRA effect {lora_effect:.4f}, quantization error {quant_error:.4f}, "
          f"full+LoRA vs quantized+LoRA {gap:.4f}, difference of the LoRA's effect {delta_gap:.4f}")
    assert lora_effect > 0.05 and quant_error > 0  # trained; and the base really was stored in another form
    assert gap < quant_error + 0.25 * lora_effect
    assert delta_gap < 0.25 * lora_effect
