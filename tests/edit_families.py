"""Shared cases for the edit and reference families (FLUX.1 Kontext, Qwen-Image-Edit / Edit-2509 / Edit-2511,
FLUX.2 [klein] and [dev] references): tiny bases, paired data, recipes, and each pipeline's own computation of a batch's
prediction (its encode, pack, ids and slicing helpers), written out independently of the family code."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tests.helpers import write_recipe


@dataclass(frozen=True)
class Case:
    family: str  # the family the base detects as
    builder: str  # finetune.models.tiny name
    pipeline: str  # the stock edit pipeline
    count: int  # conditioning images per example in the tests
    targets: str  # the LoRA preset that reaches every block kind
    build: dict = field(default_factory=dict)


CASES = {
    "flux_kontext": Case("flux_kontext", "flux_kontext", "FluxKontextPipeline", 1, "all_linear"),
    "qwen_image_edit": Case("qwen_image_edit", "qwen_image_edit", "QwenImageEditPipeline", 1, "attention_mlp"),
    "qwen_image_edit_plus": Case("qwen_image_edit_plus", "qwen_image_edit_plus", "QwenImageEditPlusPipeline", 2,
                                 "attention_mlp"),
    "qwen_image_edit_2511": Case("qwen_image_edit_plus", "qwen_image_edit_plus", "QwenImageEditPlusPipeline", 1,
                                 "attention_mlp", {"zero_cond_t": True}),
    "flux2_klein": Case("flux2_klein", "flux2_klein", "Flux2KleinPipeline", 2, "all_linear"),
    "flux2_dev": Case("flux2_dev", "flux2_dev", "Flux2Pipeline", 2, "all_linear"),
}
CAPTIONS = ["make it red", "turn the square into a circle", "make it blue", "red"]


def pairs(root: Path, count: int, n: int = 4, size: int = 64, seed: int = 0) -> Path:
    """target/ with captions beside control/ (or control_1/ ...): random pictures, every image different."""
    rng = np.random.default_rng(seed)
    dirs = ["control"] if count == 1 else [f"control_{i + 1}" for i in range(count)]
    for d in ["target", *dirs]:
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / "target" / f"{i}.png")
        (root / "target" / f"{i}.txt").write_text(CAPTIONS[i % len(CAPTIONS)])
        for d in dirs:
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / d / f"{i}.png")
    return root


def recipe(tmp_path: Path, base: Path, case: Case, **sections) -> Path:
    """A 3-step LoRA recipe (rank 4, alpha 2) on 64 px pairs, 32 caption tokens where the family has a limit."""
    from finetune.recipe import deep_merge

    defaults = {"model": {"max_sequence_length": 32},
                "data": {"conditioning": {"count": case.count}},
                "method": {"name": "lora", "rank": 4, "alpha": 2, "targets": case.targets},
                "train": {"max_steps": 3, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 0, "seed": 5}}
    return write_recipe(tmp_path, base, pairs(tmp_path / "pairs", case.count), **deep_merge(defaults, sections))


def stock(case: Case, base: Path):
    """The stock edit pipeline of a tiny base (Qwen-Image-Edit's processor loaded without torchvision)."""
    import diffusers

    from finetune.models.families import FAMILIES

    extra = {n: FAMILIES[case.family].load_component(n, str(base)) for n in FAMILIES[case.family].extra_parts}
    pipe = getattr(diffusers, case.pipeline).from_pretrained(base, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flow_draws(seed: int, shape, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The trainer's noise and uniform u of a first step's n examples (diffusers' own density helper)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from tests.helpers import first_step_generators

    noise, u = [], []
    for g in first_step_generators(seed, 0, 0, n):
        noise.append(torch.randn(shape, generator=g))
        u.append(compute_density_for_timestep_sampling("none", 1, logit_mean=0.0, logit_std=1.0, generator=g))
    return torch.stack(noise), torch.cat(u)


# ------------------------------------------------------------------------- each pipeline's own computation
# `draw(clean latents) -> (noisy latents, sigmas)`: the trainer's noise and timesteps for the batch
def kontext_prediction(pipe, batch, draw, max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean target latents, prediction) as FluxKontextPipeline computes them for a batch."""
    px = batch["pixel_values"]
    b, _, height, width = px.shape
    latents = pipe._encode_vae_image(px, generator=None)
    noisy, sigmas = draw(latents)
    packed = pipe._pack_latents(noisy, b, *noisy.shape[1:])
    _, refs, latent_ids, ref_ids = pipe.prepare_latents(batch["reference_pixels"][0], b, noisy.shape[1], height,
                                                        width, torch.float32, "cpu", None, latents=packed)
    embeds, pooled, text_ids = pipe.encode_prompt(batch["captions"], None, device="cpu",
                                                  max_sequence_length=max_sequence_length)
    out = pipe.transformer(hidden_states=torch.cat([packed, refs], dim=1), timestep=sigmas, guidance=torch.ones(b),
                           pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                           img_ids=torch.cat([latent_ids, ref_ids], dim=0), return_dict=False)[0]
    return latents, pipe._unpack_latents(out[:, : packed.shape[1]], height, width, pipe.vae_scale_factor)


def qwen_edit_prediction(pipe, batch, draw, plus: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean target latents, prediction) as QwenImageEdit(Plus)Pipeline computes them, one example at a time
    (the Plus pipeline takes batch size 1), the prompts padded to the batch's longest."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
        CONDITION_IMAGE_SIZE,
        VAE_IMAGE_SIZE,
        calculate_dimensions,
    )

    px = batch["pixel_values"]
    b, _, height, width = px.shape
    latents = pipe._encode_vae_image(px.unsqueeze(2), generator=None).squeeze(2)
    noisy, sigmas = draw(latents)
    preds = []
    for i in range(b):
        refs = [c[i : i + 1] for c in batch["reference_pixels"]]
        pil = [pipe.image_processor.postprocess(r, output_type="pil")[0] for r in refs]
        area = CONDITION_IMAGE_SIZE if plus else VAE_IMAGE_SIZE  # the pipelines' resize of what the encoder sees
        pil = [pipe.image_processor.resize(im, *reversed(calculate_dimensions(area, im.width / im.height)))
               for im in pil]
        embeds, mask = pipe.encode_prompt(batch["captions"][i : i + 1], image=pil if plus else pil[0], device="cpu")
        x = noisy[i : i + 1].unsqueeze(2)
        packed = pipe._pack_latents(x, 1, x.shape[1], *x.shape[-2:])
        _, ref_tokens = pipe.prepare_latents([r.unsqueeze(2) for r in refs] if plus else refs[0].unsqueeze(2), 1,
                                             x.shape[1], height, width, torch.float32, "cpu", None, latents=packed)
        cell = pipe.vae_scale_factor * 2
        shapes = [[(1, x.shape[-2] // 2, x.shape[-1] // 2)] + [(1, r.shape[-2] // cell, r.shape[-1] // cell)
                                                                 for r in refs]]
        out = pipe.transformer(hidden_states=torch.cat([packed, ref_tokens], dim=1), timestep=sigmas[i : i + 1],
                               encoder_hidden_states=embeds, encoder_hidden_states_mask=mask, img_shapes=shapes,
                               return_dict=False)[0]
        preds.append(pipe._unpack_latents(out[:, : packed.shape[1]], height, width, pipe.vae_scale_factor)[:, :, 0])
    return latents, torch.cat(preds)


def klein_prediction(pipe, batch, draw, max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean target latents, prediction) as Flux2KleinPipeline (or Flux2Pipeline: FLUX.2 [dev], with its
    guidance input at the trainer's 1.0) computes them; its reference helper takes one example's images at a
    time (it repeats them over a batch)."""
    px = batch["pixel_values"]
    b = px.shape[0]
    latents = pipe._encode_vae_image(px, generator=None)
    noisy, sigmas = draw(latents)
    packed, ids = pipe._pack_latents(noisy), pipe._prepare_latent_ids(noisy)
    ref_tokens, ref_ids = zip(*[pipe.prepare_image_latents([c[i : i + 1] for c in batch["reference_pixels"]], 1,
                                                           None, "cpu", torch.float32) for i in range(b)],
                              strict=True)
    embeds, text_ids = pipe.encode_prompt(batch["captions"], device="cpu", max_sequence_length=max_sequence_length)
    out = pipe.transformer(hidden_states=torch.cat([packed, torch.cat(ref_tokens)], dim=1), timestep=sigmas,
                           guidance=torch.ones(b) if pipe.transformer.config.guidance_embeds else None,
                           encoder_hidden_states=embeds, txt_ids=text_ids,
                           img_ids=torch.cat([ids, torch.cat(ref_ids)], dim=1), return_dict=False)[0]
    return latents, pipe._unpack_latents_with_ids(out[:, : packed.shape[1]], ids)
