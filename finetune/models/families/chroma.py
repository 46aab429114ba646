"""Chroma (Chroma1-HD / -Base, Lodestone Labs): FLUX.1 [schnell] cut down to 8.9B parameters, a
`ChromaTransformer2DModel` trained with rectified flow, driven as `ChromaPipeline` drives it:

- text: T5-XXL only (no CLIP, no pooled vector), `max_sequence_length` tokens (512, the pipeline's default),
  encoded with the tokenizer's attention mask; the transformer's text mask keeps the caption and its first
  padding token (`mask_indices <= seq_lengths` in `_get_t5_prompt_embeds`) and hides the rest. Text position
  ids are zeros;
- latents: FLUX.1's 16-channel VAE, `(z - shift_factor) * scaling_factor`, packed 2x2 with (0, row, column) ids
  (the FLUX pipeline's helpers, which ChromaPipeline copies), the prediction unpacked before the loss;
- timestep: sigma (the pipeline passes t / 1000). The modulations come from the `distilled_guidance_layer`
  approximator (timestep only, guidance fixed at 0): no per-block modulation linears, no guidance input.

The text mask is boolean here. The stock pipeline builds it as a float 0/1 tensor, and a float mask reaches
`scaled_dot_product_attention` as an additive bias (+1 / +0), so it hides nothing (diffusers issue #12116; the
installed 0.42.1 still does so). Chroma was trained with the padding hidden, and ComfyUI, SimpleTuner and
ai-toolkit hide it, so training does too. Validation passes the same boolean mask, and `_prepare_attention_mask`
keeps a boolean mask boolean, so samples see what training saw.

Guidance: Chroma is not guidance-distilled; it samples with real classifier-free guidance (`guidance_scale`,
5.0 in the pipeline) and a negative prompt, and trains on the plain text-conditioned flow loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finetune.export.layouts import TRANSFORMER_WORDS, ModuleNames
from finetune.models.families.flux import ALL_LINEAR, ATTENTION
from finetune.models.family import Family

if TYPE_CHECKING:
    import torch

MASK = "prompt_attention_mask"

# Chroma's blocks have FLUX's module names without the modulation linears (norm1.linear, norm.linear), so
# FLUX's presets apply except all_linear_mod
CHROMA_PRESETS: dict[str, list[str] | str] = {
    # both streams' attention in the double blocks, q/k/v in the single blocks (SimpleTuner's Chroma 'all')
    "attention": ATTENTION,
    # + the double blocks' MLPs (SimpleTuner's 'all+ffs' without the single blocks' projections)
    "attention_mlp": ATTENTION + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"],
    # + the single blocks' proj_mlp / proj_out: every linear of every block (SimpleTuner's 'all+ffs'; what
    # ai-toolkit's FLUX target list reaches on Chroma, which has no modulation linears)
    "all_linear": ALL_LINEAR,
}


@dataclass(frozen=True)
class ChromaFamily(Family):
    def encode_prompt(self, comps, captions: list[str], device: Any) -> dict[str, torch.Tensor]:
        import torch

        tok, t5 = comps.tokenizer_for("text_encoder"), comps.encoder("text_encoder")
        length = self.sequence_length(comps)
        inputs = tok(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        mask = inputs.attention_mask.to(device)
        embeds = t5(inputs.input_ids.to(device), attention_mask=mask, output_hidden_states=False)[0]
        # the caption's tokens and the first padding token (`</s>` is part of the caption here)
        keep = torch.arange(length, device=device)[None] <= mask.sum(1, keepdim=True)
        return {"prompt_embeds": embeds, MASK: keep.long()}

    def predict(self, denoiser, noisy, timesteps, text, batch) -> torch.Tensor:
        import torch
        from diffusers import ChromaPipeline

        from finetune.models.families.flux import packed_tokens

        b, _, h, w = noisy.shape
        embeds = text["prompt_embeds"]
        packed, img_ids, txt_ids = packed_tokens(noisy, embeds)  # ChromaPipeline's helpers are FluxPipeline's
        image = torch.ones(b, packed.shape[1], device=noisy.device, dtype=torch.bool)
        mask = torch.cat([text[MASK].to(noisy.device).bool(), image], dim=1)
        out = denoiser(hidden_states=packed, timestep=timesteps / 1000, encoder_hidden_states=embeds,
                       txt_ids=txt_ids, img_ids=img_ids, attention_mask=mask, return_dict=False)[0]
        return ChromaPipeline._unpack_latents(out, h, w, 1)  # vae_scale_factor 1: latent-space sizes


CHROMA = ChromaFamily(
    "chroma",
    pipeline_class="ChromaPipeline",
    denoiser_name="transformer",
    denoiser_class="ChromaTransformer2DModel",
    lora_text_encoders=(),
    objective="flow",
    # the pipeline samples with FLUX.1's resolution shift (calculate_shift over the scheduler config: mu 0.5 at
    # 256 tokens to 1.15 at 4096); training draws logit-normal sigmas shifted the same way, as for FLUX.1
    # (sd-scripts' 'flux_shift', ai-toolkit, SimpleTuner); diffusers has no Chroma training script
    flow_defaults={"sampling": "logit_normal", "resolution_shift": True},
    patch_size=2,
    text_masks={MASK: "bool"},  # boolean: SDPA hides it then (a float 0/1 mask would be added to the scores)
    max_sequence_length=512,
    # ComfyUI's Chroma model subclasses its Flux model, so comfy/lora.py maps 'lora_transformer_<diffusers
    # path>' (OneTrainer's spelling) through flux_to_diffusers onto Chroma's fused BFL weights
    kohya_names={"transformer": ModuleNames("lora_transformer", words=TRANSFORMER_WORDS)},
    single_file_text={},
    single_file_writer=False,
    base_version="chroma",
    modelspec_arch={"flow": "chroma"},
    embedding_keys={},
    pipeline_kwargs={},
    lora_presets=CHROMA_PRESETS,
    default_sampler="base",
    default_guidance=5.0,
    cache_text_by_default=True,
    textual_inversion=False,
    frozen_text_encoder="T5-XXL",
    # Chroma's original checkpoint (Chroma1-HD.safetensors) has FLUX's double_blocks too: its approximator
    # names it, and it is asked before FLUX
    single_file_signs=("distilled_guidance_layer.", "model.diffusion_model.distilled_guidance_layer."),
    priority=31,
)
