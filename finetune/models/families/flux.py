"""FLUX.1 [dev] / [schnell]: a `FluxTransformer2DModel` (double-stream + single-stream blocks) trained with
rectified flow, exactly as `FluxPipeline` drives it:

- text: CLIP-L's pooled output -> `pooled_projections`; T5-XXL's last hidden state (`max_sequence_length`
  tokens: 512 for [dev], 256 for [schnell], the lengths each was trained with) -> `encoder_hidden_states`;
  text position ids are zeros;
- latents: `(z - shift_factor) * scaling_factor` from the 16-channel VAE, packed into 2x2 patches
  (`FluxPipeline._pack_latents`) with (0, row, column) position ids (`_prepare_latent_image_ids`), and the
  prediction unpacked back to the latent layout before the loss;
- timestep: sigma (the pipeline passes t / 1000); guidance: the guidance-distilled [dev] takes a guidance
  value while training (`model.guidance`; 1.0 by default: what kohya's docs advise and SimpleTuner and
  ai-toolkit default to; diffusers' script and sd-scripts default to 3.5), [schnell] has no guidance input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finetune.export.layouts import TRANSFORMER_WORDS, ClipNames, ModuleNames
from finetune.models.family import Family
from finetune.models.sampling import Sampling, Variant

if TYPE_CHECKING:
    import torch

#: T5 tokens per caption of FLUX.1 [schnell] (the family's max_sequence_length, 512, is [dev]'s)
SCHNELL_TOKENS = 256
#: the guidance value [dev] is trained at when the recipe leaves `model.guidance` null (see the module docstring)
TRAIN_GUIDANCE = 1.0

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
ALL_LINEAR = (r"(transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|"
              r"to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))|single_transformer_blocks\.\d+\."
              r"(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out))")
FLUX_PRESETS: dict[str, list[str] | str] = {
    # attention of both block kinds (single blocks have to_q/k/v and fold the output into proj_out)
    "attention": ATTENTION,
    # diffusers' FLUX LoRA default: attention + both streams' MLPs of the double blocks
    "attention_mlp": ATTENTION + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"],
    # + the single blocks' MLP input (proj_mlp) and output projection (proj_out): every attention and MLP
    # linear of every block (a regex: peft full-matches it, and the transformer's final proj_out stays out)
    "all_linear": ALL_LINEAR,
    # + the blocks' modulation linears (norm1 / norm1_context / norm .linear): every Linear of every block, what
    # sd-scripts' FLUX LoRA trains (its 304 fused BFL modules: 19 x 10 double + 38 x 3 single)
    "all_linear_mod": ALL_LINEAR[:-1] + r"|transformer_blocks\.\d+\.(norm1|norm1_context)\.linear"
                                        r"|single_transformer_blocks\.\d+\.norm\.linear)",
}


@dataclass(frozen=True)
class FluxFamily(Family):
    def encode_prompt(self, comps, captions: list[str], device: Any) -> dict[str, torch.Tensor]:
        clip_tok, clip = comps.tokenizer_for("text_encoder"), comps.encoder("text_encoder")
        ids = clip_tok(captions, padding="max_length", max_length=clip_tok.model_max_length, truncation=True,
                       return_tensors="pt").input_ids
        pooled = clip(ids.to(device), output_hidden_states=False).pooler_output
        length = self.sequence_length(comps)
        t5_tok, t5 = comps.tokenizer_for("text_encoder_2"), comps.encoder("text_encoder_2")
        ids = t5_tok(captions, padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt").input_ids
        return {"prompt_embeds": t5(ids.to(device), output_hidden_states=False)[0], "pooled_prompt_embeds": pooled}

    def default_sequence_length(self, denoiser) -> int | None:
        """[dev] (guidance input) was trained with 512 T5 tokens, [schnell] with 256 (sd-scripts uses the same
        lengths; FluxPipeline defaults to 512 for both)."""
        return self.max_sequence_length if denoiser_config(denoiser).get("guidance_embeds") else SCHNELL_TOKENS

    def guidance_kwargs(self, pipe, scale: float | None) -> dict[str, Any]:
        """[dev] takes the scale as its distilled guidance input (default 3.5). A transformer without one
        ([schnell], the toy) samples without guidance by default, and with an explicit scale above 1 gets true
        classifier-free guidance against the negative prompt."""
        if denoiser_config(pipe.transformer).get("guidance_embeds"):
            return {"guidance_scale": self.default_guidance if scale is None else scale}
        if scale is None or scale <= 1:
            return {"guidance_scale": 0.0}  # ignored by a transformer without a guidance input
        return {"true_cfg_scale": scale}

    def edit_kwargs(self, images, size) -> dict[str, Any]:
        """FluxKontextPipeline takes one image; without its auto-resize (to Kontext's preferred ~1 MP sizes) it
        keeps the image's own size and `max_area` keeps the output at `size`."""
        return {"image": images[0], "_auto_resize": False, "max_area": size[0] * size[1]}

    def predict(self, denoiser, noisy, timesteps, text, batch) -> torch.Tensor:
        import torch
        from diffusers import FluxPipeline

        b, _, h, w = noisy.shape
        packed, img_ids, txt_ids = packed_tokens(noisy, text["prompt_embeds"])
        n = packed.shape[1]
        packed, img_ids = _with_references(packed, img_ids, batch.get("references") or [], noisy.dtype)
        guidance = None
        if denoiser_config(denoiser).get("guidance_embeds"):
            value = batch.get("guidance")
            value = TRAIN_GUIDANCE if value is None else value  # an explicit 0 trains at guidance 0
            guidance = torch.full((b,), float(value), device=noisy.device, dtype=torch.float32)
        out = denoiser(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                       pooled_projections=text["pooled_prompt_embeds"], encoder_hidden_states=text["prompt_embeds"],
                       txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        # the target's tokens only (the loss never sees the references); the inverse of the packing:
        # vae_scale_factor 1 makes _unpack_latents take latent-space sizes
        return FluxPipeline._unpack_latents(out[:, :n], h, w, 1)


def packed_tokens(noisy, embeds):
    """The sequence a FLUX.1-style transformer (FLUX.1, Chroma) reads, as FluxPipeline makes it: [B, C, H, W]
    latents packed in 2x2 patches, their (0, row, column) position ids, and the text's all-zero ids."""
    import torch
    from diffusers import FluxPipeline

    b, c, h, w = noisy.shape
    packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
    return packed, img_ids, torch.zeros(embeds.shape[1], 3, device=noisy.device, dtype=noisy.dtype)


def _with_references(packed, img_ids, conditions, dtype):
    """FLUX.1 Kontext's reference tokens, as FluxKontextPipeline.prepare_latents makes them: each conditioning
    latent packed in 2x2 patches and appended to the sequence, its position ids the target grid's with the first
    axis set to 1 (so the model tells them from the target tokens at 0)."""
    import torch
    from diffusers import FluxKontextPipeline

    tokens, ids = [packed], [img_ids]
    for ref in conditions:
        b, c, h, w = ref.shape
        tokens.append(FluxKontextPipeline._pack_latents(ref.to(packed.dtype), b, c, h, w))
        ref_ids = FluxKontextPipeline._prepare_latent_image_ids(b, h // 2, w // 2, packed.device, dtype)
        ref_ids[..., 0] = 1
        ids.append(ref_ids)
    return torch.cat(tokens, dim=1), torch.cat(ids, dim=0)


def denoiser_config(denoiser) -> dict:
    """The config of a denoiser that may be wrapped (DDP, compile)."""
    inner = getattr(denoiser, "module", denoiser)
    inner = getattr(inner, "_orig_mod", inner)
    return dict(inner.config)


# FLUX.1 [dev] (and Krea, fine-tunes of it) takes the guidance as an input (guidance-distilled; BFL's 28-50 steps
# at 3.5); FLUX.1 [schnell] is also step-distilled: 1-4 steps, no guidance input, a static shift of 1 (its
# scheduler config; BFL and diffusers sample it at 4 steps, guidance 0). A FLUX transformer with neither (the
# FLUX toy, de-distilled community bases) samples with true CFG against a negative prompt.
FLUX_VARIANTS = (
    Variant(Sampling(28, 3.5, distilled=("guidance",), what="FLUX.1 [dev]"), {"transformer.guidance_embeds": True}),
    Variant(Sampling(4, 0.0, distilled=("guidance", "steps"), what="FLUX.1 [schnell]"),
            {"transformer.guidance_embeds": False, "scheduler.use_dynamic_shifting": False}),
)

FLUX = FluxFamily(
    "flux",
    pipeline_class="FluxPipeline",
    denoiser_name="transformer",
    denoiser_class="FluxTransformer2DModel",
    text_encoder_names=("text_encoder", "text_encoder_2"),
    lora_text_encoders=("text_encoder",),  # CLIP LoRAs; T5 stays frozen
    tokenizer_names=("tokenizer", "tokenizer_2"),
    objective="flow",
    # peers shift by resolution and sample logit-normal (sd-scripts 'flux_shift', ai-toolkit, SimpleTuner);
    # diffusers' script samples uniformly on the unshifted grid: docs/toy.md measures both on the toy
    flow_defaults={"sampling": "logit_normal", "resolution_shift": True},
    patch_size=2,
    max_sequence_length=512,
    kohya_names={"transformer": ModuleNames("lora_transformer", words=TRANSFORMER_WORDS),
                 "text_encoder": ClipNames("lora_te1")},
    base_version="flux1",
    modelspec_arch={"flow": "flux-1-dev"},
    embedding_keys={"text_encoder": "clip_l", "text_encoder_2": "t5"},
    pipeline_kwargs={},
    lora_presets=FLUX_PRESETS,
    default_sampler="base",
    default_guidance=3.5,
    cache_text_by_default=True,
    swap_blocks=("transformer_blocks", "single_transformer_blocks"),
    token_routing="text_first_rope",
    textual_inversion=True,  # new rows in CLIP-L and T5 (both see the token)
    # a FLUX.1 base trains edits the Kontext way (the toy edit does): one reference, FluxKontextPipeline samples
    max_conditions=1,
    edit_pipeline_class="FluxKontextPipeline",
    lora_layouts={"bfl": "finetune.models.families.flux_bfl"},
    single_file_writer=False,
    single_file_text={},
    single_file_signs=("double_blocks.", "model.diffusion_model.double_blocks."),
    priority=30,
    variants=FLUX_VARIANTS,
)
