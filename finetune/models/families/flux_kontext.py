"""FLUX.1 Kontext [dev]: FLUX.1's transformer, trained to edit an input image, driven exactly as
`FluxKontextPipeline` drives it (the mechanics live in the flux family, which any FLUX.1 base trains edits with):

- the input image's latents are packed in 2x2 patches like the target's and appended to the token sequence, with
  the target grid's position ids whose first axis is 1 (the target's is 0); the prediction keeps the target's
  tokens only, so the loss never sees the reference;
- text, latents, timesteps and the distilled guidance input are FLUX.1 [dev]'s; guidance 2.5 samples (BFL's
  model card), training feeds 1.0 as for [dev] (`model.guidance`).

A Kontext base is told from FLUX.1 by its pipeline class (model_index.json): the weights have the same shapes, so
a single-file Kontext checkpoint loads as flux unless `model.family: flux_kontext` says otherwise. Its LoRA files
use FLUX.1's key names everywhere (ComfyUI loads Kontext as a Flux model with reference latents).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from finetune.models.families.flux import FLUX, FluxFamily

PIPELINE = "FluxKontextPipeline"


@dataclass(frozen=True)
class FluxKontextFamily(FluxFamily):
    def matches(self, model_index, denoiser_config, text_encoder_config) -> bool:
        return model_index.get("_class_name") == PIPELINE and super().matches(
            model_index, denoiser_config, text_encoder_config)


FLUX_KONTEXT = FluxKontextFamily(**{
    **{f.name: getattr(FLUX, f.name) for f in fields(FLUX)},
    "name": "flux_kontext",
    "pipeline_class": PIPELINE,
    "edit_pipeline_class": PIPELINE,
    "modelspec_arch": {"flow": "flux-1-kontext-dev"},
    "default_guidance": 2.5,
    "single_file_signs": (),  # a FLUX.1 checkpoint's keys: detected as flux, chosen with model.family
    "priority": FLUX.priority + 10,  # asked before flux, whose transformer class it shares
})
