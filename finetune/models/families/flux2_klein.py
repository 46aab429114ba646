"""FLUX.2 [klein] (4B / 9B, distilled or Base): a `Flux2Transformer2DModel` (double- and single-stream blocks,
shared modulation) trained with rectified flow, driven exactly as `Flux2KleinPipeline` drives it:

- text: the user turn of Qwen3's chat template (generation prompt, thinking off), padded to
  `max_sequence_length` (512) tokens; hidden states 9, 18 and 27 of the Qwen3 LM (4B / 8B) stacked on the
  feature axis (3 x 2560 or 3 x 4096 wide, padding included: the transformer has no text mask); text position
  ids (0, 0, 0, token) from `_prepare_text_ids`;
- latents: the 32-channel FLUX.2 VAE, patchified 2x2 into 128 channels (`_patchify_latents`) and normalised with
  the VAE's batch-norm running statistics; our latent layout is that [B, 128, H/16, W/16] tensor, packed into
  tokens (`_pack_latents`) with (0, row, column, 0) ids (`_prepare_latent_ids`) and unpacked after;
- timestep: sigma (the pipeline passes t / 1000); no guidance input ([klein] has no guidance embedding);
- reference images (data.conditioning): each one's latents packed like the target's and appended to the
  sequence, with ids whose time coordinate is 10, 20, ... (`_prepare_image_ids`); the prediction keeps the
  target's tokens, so the loss never sees the references.

Guidance: [klein] 4B / 9B are step-distilled (4 steps) and sample without CFG (`is_distilled` in the base's
model_index.json: the pipeline then ignores the guidance scale); [klein] Base samples with CFG 4 over ~50
steps. Both train on the plain text-conditioned flow loss (as diffusers' script). Validation keeps the base's
`is_distilled`, so the default scale (4.0) is CFG on Base and ignored on the distilled models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finetune.export.layouts import TRANSFORMER_WORDS, ModuleNames
from finetune.models.family import Family, llm_flow_transformer
from finetune.models.sampling import Sampling, Variant

if TYPE_CHECKING:
    import torch

LAYERS = (9, 18, 27)  # Flux2KleinPipeline's text_encoder_out_layers

_DOUBLE_ATTN = r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_DOUBLE_MLP = r"transformer_blocks\.\d+\.(ff|ff_context)\.(linear_in|linear_out)"
_SINGLE = r"single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)"
# regexes peft full-matches: the double blocks' attention has a `to_out` list next to the single blocks' `to_out`
# linear, so suffixes cannot tell them apart
FLUX2_PRESETS: dict[str, str] = {
    # the double blocks' joint attention, image and text side
    "attention": _DOUBLE_ATTN,
    # + their MLPs (SwiGLU in, out)
    "attention_mlp": f"({_DOUBLE_ATTN}|{_DOUBLE_MLP})",
    # + the single blocks' fused qkv + MLP input and fused output: every linear of every block (diffusers'
    # script trains the double blocks' image attention and both single-block projections)
    "all_linear": f"({_DOUBLE_ATTN}|{_DOUBLE_MLP}|{_SINGLE})",
}
FLUX2_WORDS = TRANSFORMER_WORDS + ("to_qkv_mlp_proj", "linear_in", "linear_out", "double_stream_modulation_img",
                                   "double_stream_modulation_txt", "single_stream_modulation",
                                   "time_guidance_embed", "norm_added_q", "norm_added_k")


@dataclass(frozen=True)
class Flux2KleinFamily(Family):
    def matches(self, model_index, denoiser_config, text_encoder_config) -> bool:
        """FLUX.2 [dev] shares the transformer class but reads Mistral-3 states with a guidance input."""
        if not super().matches(model_index, denoiser_config, text_encoder_config):
            return False
        if text_encoder_config:
            return text_encoder_config.get("model_type") == "qwen3"
        return not denoiser_config.get("guidance_embeds", False)

    def encode_prompt(self, comps, captions: list[str], device: Any) -> dict[str, torch.Tensor]:
        import torch

        tok, encoder = comps.tokenizer_for("text_encoder"), comps.encoder("text_encoder")
        length = self.sequence_length(comps)
        texts = [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False) for c in captions]
        inputs = tok(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        lm = getattr(encoder, "model", encoder)  # the hidden states without the LM head's logits
        out = lm(input_ids=inputs.input_ids.to(device), attention_mask=inputs.attention_mask.to(device),
                 output_hidden_states=True, use_cache=False)
        states = torch.stack([out.hidden_states[k] for k in LAYERS], dim=2)  # [B, L, 3, D]
        return {"prompt_embeds": states.flatten(2)}

    def encode_latents(self, vae, pixel_values: torch.Tensor) -> torch.Tensor:
        import torch
        from diffusers import Flux2KleinPipeline

        z = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist.mode().float()
        z = Flux2KleinPipeline._patchify_latents(z)
        mean = vae.bn.running_mean.float().view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.float().view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        return (z - mean) / std

    def predict(self, denoiser, noisy, timesteps, text, batch) -> torch.Tensor:
        import torch
        from diffusers import Flux2KleinPipeline as Pipe

        embeds = text["prompt_embeds"]
        ids = Pipe._prepare_latent_ids(noisy).to(noisy.device)
        tokens = Pipe._pack_latents(noisy)
        all_tokens, all_ids = tokens, ids
        refs = batch.get("references") or []
        if refs:  # reference images: packed one token per latent pixel, told apart by their time coordinate
            ref_ids = Pipe._prepare_image_ids([r[:1] for r in refs]).to(noisy.device)  # 10, 20, ... per image
            all_tokens = torch.cat([tokens, *[Pipe._pack_latents(r.to(noisy.dtype)) for r in refs]], dim=1)
            all_ids = torch.cat([ids, ref_ids.expand(noisy.shape[0], -1, -1)], dim=1)
        guidance = train_guidance(denoiser, batch, noisy)  # None for [klein]; FLUX.2 [dev] takes one
        out = denoiser(hidden_states=all_tokens, timestep=timesteps / 1000, guidance=guidance,
                       encoder_hidden_states=embeds, txt_ids=Pipe._prepare_text_ids(embeds).to(noisy.device),
                       img_ids=all_ids, return_dict=False)[0]
        return Pipe._unpack_latents_with_ids(out[:, : tokens.shape[1]], ids, *noisy.shape[-2:])


def train_guidance(denoiser, batch, noisy):
    """The guidance input of a guidance-distilled transformer while training (`model.guidance`, else FLUX's
    TRAIN_GUIDANCE); None for a transformer without one."""
    import torch

    from finetune.models.families.flux import TRAIN_GUIDANCE, denoiser_config

    if not denoiser_config(denoiser).get("guidance_embeds"):
        return None
    value = TRAIN_GUIDANCE if batch.get("guidance") is None else batch["guidance"]
    return torch.full((noisy.shape[0],), float(value), device=noisy.device, dtype=torch.float32)


FLUX2_KLEIN = Flux2KleinFamily("flux2_klein", **llm_flow_transformer(
    pipeline_class="Flux2KleinPipeline",
    denoiser_class="Flux2Transformer2DModel",
    # logit-normal timesteps with FLUX's resolution shift (mu 1.15 at 1 MP): FLUX.2 samples at strongly
    # shifted sigmas (its empirical mu is ~2 at 1 MP), so training weights the noisy half more, as peers do;
    # diffusers' script trains on the unshifted grid (train.flow.resolution_shift: false)
    flow_defaults={"sampling": "logit_normal", "resolution_shift": True},
    patch_size=1,  # our latents are already patchified 2x2: one token per latent pixel
    # ComfyUI's FLUX.2 model is a FLUX model there: comfy/lora.py maps 'lora_transformer_<diffusers path>'
    # (OneTrainer's spelling) through flux_to_diffusers, which knows FLUX.2's names (to_qkv_mlp_proj -> linear1,
    # ff.linear_in -> img_mlp.0, ...)
    kohya_names={"transformer": ModuleNames("lora_transformer", words=FLUX2_WORDS)},
    base_version="flux2_klein",
    modelspec_arch={"flow": "flux-2-klein"},
    pipeline_config_keys=("is_distilled",),
    lora_presets=FLUX2_PRESETS,
    default_guidance=4.0,
    frozen_text_encoder="Qwen3",
    # reference images enter as appended tokens with time offsets (Flux2KleinPipeline.prepare_image_latents); four
    # is what we allow per example, though the pipeline takes any number
    max_conditions=4,
    edit_pipeline_class="Flux2KleinPipeline",
    # BFL: [klein] 4B / 9B are step- and guidance-distilled (4 steps; the pipeline ignores the scale when
    # model_index.json says is_distilled), [klein] Base 4B / 9B neither (CFG 4 over 50 steps, diffusers' example)
    sampling=Sampling(50, 4.0, what="FLUX.2 [klein] Base"),
    variants=(Variant(Sampling(4, 1.0, distilled=("guidance", "steps"), what="FLUX.2 [klein] (distilled)"),
                      {"model_index.is_distilled": True}),),
))
