"""Z-Image (Turbo and base): a single-stream DiT (`ZImageTransformer2DModel`, 6B) trained with rectified flow,
driven exactly as `ZImagePipeline` drives it:

- text: the user turn of Qwen3's chat template (`apply_chat_template`, generation prompt, thinking on),
  tokenized to `max_sequence_length` (512) tokens; the Qwen3-4B encoder's second-to-last hidden state, keeping
  only the prompt's tokens (the transformer takes one variable-length caption per image). We keep a fixed-length
  zero-padded tensor and its mask (`prompt_mask`), so cached captions stack; `predict` cuts each back;
- latents: FLUX.1's 16-channel VAE, `(z - shift_factor) * scaling_factor`; the transformer patches 2x2 itself
  and takes a list of [C, 1, H, W] latents;
- time runs the other way: the transformer is given 1 - sigma and predicts the negative of the flow target
  (the pipeline negates its output); `predict` returns the flow-target form, so the objective is the usual one.

Guidance: Z-Image-Turbo is distilled to sample in 8 steps without classifier-free guidance (guidance 0) and has
no guidance input. LoRAs train on it with the plain flow-matching loss (text-conditioned, no CFG, as diffusers'
and peers' scripts do); validation samples as Turbo is used: guidance 0 (set validation.guidance_scale ~4 and
50 steps for the undistilled Z-Image base).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finetune.export.layouts import ModuleNames
from finetune.models.family import Family, llm_flow_transformer
from finetune.models.sampling import Sampling, Variant

if TYPE_CHECKING:
    import torch

ATTENTION = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0"]
Z_IMAGE_PRESETS: dict[str, list[str]] = {
    # diffusers' Z-Image LoRA default: the attention of every block (main layers and both refiners)
    "attention": ATTENTION,
    # + the SwiGLU feed-forward (w1 gate, w3 up, w2 down): every linear of every block but the modulation
    "attention_mlp": ATTENTION + ["feed_forward.w1", "feed_forward.w2", "feed_forward.w3"],
}

# compound words of Z-Image's diffusers module names (kohya / LyCORIS keys write '.' as '_')
Z_IMAGE_WORDS = ("noise_refiner", "context_refiner", "feed_forward", "to_q", "to_k", "to_v", "to_out",
                 "adaLN_modulation", "attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2",
                 "all_x_embedder", "all_final_layer", "cap_embedder", "t_embedder", "norm_q", "norm_k")


@dataclass(frozen=True)
class ZImageFamily(Family):
    def encode_prompt(self, comps, captions: list[str], device: Any) -> dict[str, torch.Tensor]:
        tok, encoder = comps.tokenizer_for("text_encoder"), comps.encoder("text_encoder")
        length = self.sequence_length(comps)
        texts = [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=True) for c in captions]
        inputs = tok(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        mask = inputs.attention_mask.to(device).bool()
        hidden = encoder(input_ids=inputs.input_ids.to(device), attention_mask=mask,
                         output_hidden_states=True).hidden_states[-2]
        return {"prompt_embeds": hidden * mask[..., None].to(hidden.dtype), "prompt_mask": mask.to(hidden.dtype)}

    def pipeline_prompt_kwargs(self, text, negative) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"prompt_embeds": captions_of(text)}
        if negative is not None:  # used only with guidance > 0 (the base model; Turbo samples without CFG)
            kwargs["negative_prompt_embeds"] = captions_of(negative)
        return kwargs

    def predict(self, denoiser, noisy, timesteps, text, batch) -> torch.Tensor:
        import torch

        latents = list(noisy.unsqueeze(2).unbind(0))  # [C, 1, H, W] per image
        t = (1000 - timesteps) / 1000  # ZImagePipeline: (1000 - t) / 1000, t = sigma * 1000
        out = denoiser(latents, t, captions_of(text), return_dict=False)[0]
        return -torch.stack(out).squeeze(2)  # the model predicts x0 - noise; the flow target is noise - x0


def captions_of(text: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Fixed-length padded embeddings -> the variable-length captions ZImagePipeline passes."""
    return [e[m.bool()] for e, m in zip(text["prompt_embeds"], text["prompt_mask"], strict=True)]


Z_IMAGE = ZImageFamily("z_image", **llm_flow_transformer(
    pipeline_class="ZImagePipeline",
    denoiser_class="ZImageTransformer2DModel",
    # logit-normal timesteps on the base's statically shifted grid (Turbo: shift 3, what it samples with);
    # diffusers' script draws on the same grid
    flow_defaults={"sampling": "logit_normal", "resolution_shift": False},
    patch_size=2,
    # ComfyUI (comfy/lora.py, Lumina2 / Z-Image branch) maps 'lycoris_<diffusers path>' (SimpleTuner's
    # spelling) and 'transformer.<diffusers path>' onto its fused qkv / out weights, slices included
    kohya_names={"transformer": ModuleNames("lycoris", words=Z_IMAGE_WORDS)},
    base_version="z_image",
    modelspec_arch={"flow": "z-image-turbo"},
    lora_presets=Z_IMAGE_PRESETS,
    default_guidance=0.0,
    frozen_text_encoder="Qwen3-4B",
    # Z-Image (base, Tongyi-MAI/Z-Image) is the undistilled model: CFG ~4 over up to 50 steps (its card; ai-toolkit
    # samples 30). Turbo has the same configs: its name tells it. 9 steps = 8 transformer calls (diffusers' and the
    # card's example), guidance 0: no CFG.
    sampling=Sampling(50, 4.0, what="Z-Image"),
    variants=(Variant(Sampling(9, 0.0, distilled=("guidance", "steps"), what="Z-Image-Turbo"), names=("turbo",)),),
))
