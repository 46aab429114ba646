"""Stable Diffusion 3 / 3.5: an MMDiT (`SD3Transformer2DModel`) trained with rectified flow.

Text conditioning, exactly as `StableDiffusion3Pipeline.encode_prompt` computes it: the penultimate hidden
states of CLIP-L and CLIP-G concatenated on the feature axis (768 + 1280), zero-padded to T5's width (4096)
and followed on the sequence axis by T5-XXL's last hidden state (`max_sequence_length` tokens, zeros when the
recipe drops T5: SD3 runs without it, and the pipeline pads with 256 zero tokens as we do; ComfyUI feeds 77, which
`model.max_sequence_length: 77` matches); the pooled embedding is both CLIPs' projected outputs concatenated.
The 16-channel VAE's latents are `(z - shift_factor) * scaling_factor`; the transformer patches 2x2 itself
and takes the timestep as sigma * 1000.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finetune.export.layouts import TRANSFORMER_WORDS, ClipNames, ModuleNames
from finetune.models.family import Family
from finetune.models.sampling import Sampling, Variant

if TYPE_CHECKING:
    import torch

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
MMDIT_PRESETS: dict[str, list[str]] = {
    # diffusers' SD3 LoRA script default: the joint attention's image and text projections
    "attention": ATTENTION,
    # + both streams' MLPs
    "attention_mlp": ATTENTION + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"],
}


@dataclass(frozen=True)
class SD3Family(Family):
    def encode_prompt(self, comps, captions: list[str], device: Any) -> dict[str, torch.Tensor]:
        import torch
        import torch.nn.functional as F

        hidden, pooled = [], []
        for name in ("text_encoder", "text_encoder_2"):
            tok, enc = comps.tokenizer_for(name), comps.encoder(name)
            ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            out = enc(ids.to(device), output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2])
        clip = torch.cat(hidden, dim=-1)
        t5 = self._t5(comps, captions, device, clip.dtype)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"prompt_embeds": torch.cat([clip, t5], dim=-2), "pooled_prompt_embeds": torch.cat(pooled, dim=-1)}

    def _t5(self, comps, captions: list[str], device, dtype) -> torch.Tensor:
        import torch

        length = self.sequence_length(comps)
        enc = comps.encoder("text_encoder_3")
        if enc is None:
            width = comps.denoiser.config.joint_attention_dim
            return torch.zeros((len(captions), length, width), device=device, dtype=dtype)
        ids = comps.tokenizer_for("text_encoder_3")(
            captions, padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
            return_tensors="pt").input_ids
        return enc(ids.to(device))[0]

    def predict(self, denoiser, noisy, timesteps, text, batch) -> torch.Tensor:
        return denoiser(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=text["prompt_embeds"],
                        pooled_projections=text["pooled_prompt_embeds"], return_dict=False)[0]


SD3 = SD3Family(
    "sd3",
    pipeline_class="StableDiffusion3Pipeline",
    denoiser_name="transformer",
    denoiser_class="SD3Transformer2DModel",
    text_encoder_names=("text_encoder", "text_encoder_2", "text_encoder_3"),
    lora_text_encoders=("text_encoder", "text_encoder_2"),  # CLIP LoRAs; T5 stays frozen
    tokenizer_names=("tokenizer", "tokenizer_2", "tokenizer_3"),
    optional_text_encoders=("text_encoder_3",),
    objective="flow",
    # diffusers' SD3 script: logit-normal(0, 1) timesteps on the scheduler's statically shifted grid (shift 3)
    flow_defaults={"sampling": "logit_normal", "resolution_shift": False},
    patch_size=2,
    max_sequence_length=256,
    # ComfyUI maps 'lora_transformer_<diffusers path>' (OneTrainer's spelling) onto SD3's MMDiT; CLIP-L and
    # CLIP-G as in SDXL (ComfyUI: lora_te1 / lora_te2)
    kohya_names={"transformer": ModuleNames("lora_transformer", words=TRANSFORMER_WORDS),
                 "text_encoder": ClipNames("lora_te1", wrapped=True), "text_encoder_2": ClipNames("lora_te2", wrapped=True)},
    base_version="sd3",
    modelspec_arch={"flow": "stable-diffusion-v3-medium"},
    embedding_keys={"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5"},
    pipeline_kwargs={},
    lora_presets=MMDIT_PRESETS,
    default_sampler="base",
    default_guidance=7.0,
    cache_text_by_default=True,
    swap_blocks=("transformer_blocks",),
    token_routing="plain",
    textual_inversion=False,  # three encoders incl. T5: not wired yet (refused at recipe time, one line)
    single_file_writer=False,
    single_file_text={},
    single_file_signs=("model.diffusion_model.joint_blocks.", "joint_blocks."),
    priority=30,
    # SD 3.5 Medium / Large: 28-40 steps at CFG 4.5-7 (Stability's cards; diffusers' examples 28 at 3.5-7.0); SD 3.5
    # Large Turbo (adversarial diffusion distillation, same configs) samples in 4 steps without CFG
    sampling=Sampling(28, 7.0, what="SD 3.5"),
    variants=(Variant(Sampling(4, 0.0, distilled=("guidance", "steps"), what="SD 3.5 Large Turbo"), names=("turbo",)),),
)
