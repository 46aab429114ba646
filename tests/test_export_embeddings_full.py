"""Embedding files (diffusers and A1111 forms) and full-model exports (diffusers folder, single file)."""

from __future__ import annotations

import torch

from finetune.export.embeddings import load_into_pipeline, read_embeddings, save_embeddings
from tests.helpers import fresh_pipe, load_comps, make_ctx


def latents(pipe, prompt: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, generator=g, output_type="latent", height=64, width=64).images


def test_both_embedding_forms_load_and_agree(tiny_base, tmp_path):
    from finetune.export.convert import convert_embedding

    rows = torch.randn(3, 32, generator=torch.Generator().manual_seed(3))
    written = save_embeddings({"text_encoder": rows}, ["<sks>"], tmp_path, make_ctx("sks"),
                              formats=("diffusers", "a1111"))
    names = {p.name for p in written}
    assert names == {"learned_embeds.safetensors", "sks.safetensors"}
    outs = []
    for path, kwargs in ((tmp_path / "learned_embeds.safetensors", {}), (tmp_path / "sks.safetensors", {"token": "<sks>"})):
        pipe = fresh_pipe(tiny_base)
        pipe.load_textual_inversion(str(path), **kwargs)  # diffusers' own loader, both forms
        outs.append(latents(pipe, "a <sks> circle"))
    plain = latents(fresh_pipe(tiny_base), "a circle")
    assert torch.equal(outs[0], outs[1]) and (outs[0] - plain).abs().max() > 1e-3
    ours = fresh_pipe(tiny_base)
    assert load_into_pipeline(ours, tmp_path / "sks.safetensors") == "<sks>"
    assert torch.equal(latents(ours, "a <sks> circle"), outs[0])
    back = convert_embedding(tmp_path / "sks.safetensors", tmp_path / "conv", "diffusers")
    assert torch.equal(read_embeddings(back).vectors["text_encoder"], rows)


def test_full_export_single_file_reloads_like_the_folder(tiny_base, tmp_path):
    from diffusers import StableDiffusionPipeline

    from finetune.export.full import export_full
    from finetune.export.io import read_metadata

    comps = load_comps(tiny_base)
    with torch.no_grad():  # a "trained" U-Net: differs from the base
        comps.unet.conv_in.weight.add_(0.05)
    ctx = make_ctx("db", formats=("diffusers", "kohya"))
    ctx.model_card = True
    written = export_full(comps, tmp_path, ctx)
    assert {p.name for p in written} == {"model", "db.safetensors", "README.md"}
    folder = fresh_pipe(tmp_path / "model")
    single = StableDiffusionPipeline.from_single_file(str(tmp_path / "db.safetensors"), config=str(tmp_path / "model"),
                                                      safety_checker=None, requires_safety_checker=False)
    single.set_progress_bar_config(disable=True)
    a, b = latents(folder, "a sks circle"), latents(single, "a sks circle")
    assert (a - b).abs().max() < 1e-6
    assert (a - latents(fresh_pipe(tiny_base), "a sks circle")).abs().max() > 1e-4
    meta = read_metadata(tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert meta["finetune.base_model"] == "tiny" and "finetune.recipe" in meta
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
