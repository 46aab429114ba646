"""FLUX.2 [dev]: the 32B `Flux2Transformer2DModel` (8 double- and 48 single-stream blocks, 6144 wide) of the
FLUX.2 [klein] family's layout, with a guidance input, trained with rectified flow and driven as `Flux2Pipeline`
drives it:

- text: each caption as the user turn after FLUX.2's system message (`format_input`, the Mistral chat template,
  no generation prompt), padded to `max_sequence_length` (512) tokens; hidden states 10, 20 and 30 of Mistral
  Small 3.1 (24B, 40 layers, 5120 wide) stacked on the feature axis (3 x 5120 = 15360, padding included: the
  transformer has no text mask); text ids (0, 0, 0, token);
- latents, packing, ids and timestep: as FLUX.2 [klein] (finetune/models/families/flux2_klein.py): the 32-channel
  VAE patchified 2x2 and batch-norm normalised, t / 1000;
- guidance: [dev] is guidance-distilled: it takes the guidance value as an input (`guidance_embeds`) and samples
  without CFG (`guidance_scale` 4.0 in the pipeline, which has no negative prompt). Training feeds
  `model.guidance`, 1.0 by default as for FLUX.1 [dev] (finetune/models/families/flux.py says why; diffusers'
  FLUX.2 script defaults to 3.5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finetune.export.layouts import ModuleNames
from finetune.models.families.flux2_klein import FLUX2_PRESETS, FLUX2_WORDS, Flux2KleinFamily
from finetune.models.family import llm_flow_transformer

if TYPE_CHECKING:
    import torch

LAYERS = (10, 20, 30)  # Flux2Pipeline's text_encoder_out_layers


@dataclass(frozen=True)
class Flux2DevFamily(Flux2KleinFamily):
    def matches(self, model_index, denoiser_config, text_encoder_config) -> bool:
        """[klein] shares the transformer class; [dev] reads Mistral-3 states and has a guidance input."""
        entry = model_index.get(self.denoiser_name)
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] == self.denoiser_class):
            return False
        if text_encoder_config:
            return text_encoder_config.get("model_type") == "mistral3"
        return bool(denoiser_config.get("guidance_embeds", False))

    def encode_prompt(self, comps, captions: list[str], device: Any) -> dict[str, torch.Tensor]:
        import torch
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input
        from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

        tok, encoder = comps.tokenizer_for("text_encoder"), comps.encoder("text_encoder")
        inputs = tok.apply_chat_template(format_input(list(captions), system_message=SYSTEM_MESSAGE),
                                         add_generation_prompt=False, tokenize=True, return_dict=True,
                                         return_tensors="pt", padding="max_length", truncation=True,
                                         max_length=self.sequence_length(comps))
        lm = getattr(encoder, "model", encoder)  # the hidden states without the LM head's logits
        out = lm(input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device),
                 output_hidden_states=True, use_cache=False)
        states = torch.stack([out.hidden_states[k] for k in LAYERS], dim=2)  # [B, L, 3, D]
        return {"prompt_embeds": states.flatten(2)}

    def pipeline_prompt_kwargs(self, text, negative) -> dict[str, Any]:
        return {"prompt_embeds": text["prompt_embeds"]}  # guidance-distilled: Flux2Pipeline takes no negative


FLUX2_DEV = Flux2DevFamily("flux2_dev", **llm_flow_transformer(
    pipeline_class="Flux2Pipeline",
    denoiser_class="Flux2Transformer2DModel",
    # as [klein]: logit-normal sigmas with FLUX.1's resolution shift (the pipeline samples further shifted, by
    # an empirical step-dependent mu); diffusers' script trains on the unshifted grid
    flow_defaults={"sampling": "logit_normal", "resolution_shift": True},
    patch_size=1,  # the latents are patchified 2x2 already: one token per latent pixel
    # ComfyUI's FLUX.2 model is its Flux model: 'lora_transformer_<diffusers path>' through flux_to_diffusers
    kohya_names={"transformer": ModuleNames("lora_transformer", words=FLUX2_WORDS)},
    base_version="flux2_dev",
    modelspec_arch={"flow": "flux-2-dev"},
    lora_presets=FLUX2_PRESETS,
    default_guidance=4.0,
    frozen_text_encoder="Mistral Small 3.1",
    # reference images as [klein] takes them (Flux2Pipeline.prepare_image_latents: appended tokens with time
    # offsets; predict is [klein]'s); BFL allows up to 10 per prompt, we allow 4 per example as for [klein]
    max_conditions=4,
    edit_pipeline_class="Flux2Pipeline",
))
