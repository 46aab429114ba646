"""Qwen-Image: a 20B MMDiT (`QwenImageTransformer2DModel`) trained with rectified flow, driven exactly as
`QwenImagePipeline` drives it:

- text: each caption inside Qwen-Image's system-prompt template, encoded by Qwen2.5-VL-7B (text only); the last
  hidden state without the template's first 34 tokens (the pipeline's `prompt_template_encode_start_idx`), with
  its attention mask. The pipeline pads a batch to its longest prompt; we pad every caption to
  `max_sequence_length` (512, the pipeline's default; at most 1024) so cached captions stack. Padding is masked
  out of the joint attention and text positions do not depend on it (tests show the output is the same);
- latents: Qwen-Image's causal video VAE on one frame, normalised per channel with the VAE's `latents_mean` /
  `latents_std`; 2x2 packing into 64-channel tokens (`QwenImagePipeline._pack_latents`) with `img_shapes`, and the
  prediction unpacked back before the loss;
- timestep: sigma (the pipeline passes t / 1000); no guidance input (Qwen-Image is not guidance-distilled).

Guidance: the model samples with true classifier-free guidance (`true_cfg_scale`, 4.0 by default) and a negative
prompt; it trains on the plain text-conditioned flow loss. Validation passes the recipe's guidance scale as
`true_cfg_scale`, with the (cached) negative prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finetune.export.layouts import ModuleNames
from finetune.models.family import Family, llm_flow_transformer

if TYPE_CHECKING:
    import torch

# QwenImagePipeline.prompt_template_encode and prompt_template_encode_start_idx (tests compare them with a
# pipeline's): the first 34 tokens, the system turn and '<|im_start|>user\n', are dropped from the states
TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
            "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
            "<|im_start|>assistant\n")
DROP = 34
MAX_TOKENS = 1024  # QwenImagePipeline refuses a longer max_sequence_length

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
QWEN_IMAGE_PRESETS: dict[str, list[str]] = {
    # the joint attention's image and text projections (diffusers' script trains the image side only)
    "attention": ATTENTION,
    # + both streams' MLPs (musubi-tuner / ai-toolkit train every linear of the blocks)
    "attention_mlp": ATTENTION + ["img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"],
}
QWEN_IMAGE_WORDS = ("transformer_blocks", "to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj",
                    "add_v_proj", "to_add_out", "img_mlp", "txt_mlp", "img_mod", "txt_mod", "img_in", "txt_in",
                    "txt_norm", "proj_out", "norm_out", "time_text_embed", "timestep_embedder", "linear_1",
                    "linear_2", "norm_q", "norm_k", "norm_added_q", "norm_added_k")


@dataclass(frozen=True)
class QwenImageFamily(Family):
    def encode_prompt(self, comps, captions: list[str], device: Any) -> dict[str, torch.Tensor]:
        tok, encoder = comps.tokenizer_for("text_encoder"), comps.encoder("text_encoder")
        length = self.sequence_length(comps)
        # the encoder is causal: states of the first DROP + length tokens do not depend on what follows, so
        # tokenizing only those gives the pipeline's states (it encodes up to 1024 + 34 and cuts after). Padding
        # on the right keeps the template's DROP tokens first whatever the tokenizer's own padding side (the
        # pipeline selects by mask; dropping by position is right only with right padding)
        inputs = tok([TEMPLATE.format(c) for c in captions], max_length=length + DROP, padding="max_length",
                     truncation=True, padding_side="right", return_tensors="pt")
        lm = getattr(encoder, "model", encoder)  # the hidden states without the LM head's logits
        hidden = lm(input_ids=inputs.input_ids.to(device), attention_mask=inputs.attention_mask.to(device),
                    output_hidden_states=True).hidden_states[-1][:, DROP:]
        mask = inputs.attention_mask[:, DROP:].to(device)
        return {"prompt_embeds": hidden * mask[..., None].to(hidden.dtype), "prompt_embeds_mask": mask}

    def pipeline_prompt_kwargs(self, text, negative) -> dict[str, Any]:
        return super().pipeline_prompt_kwargs(text, negative) | {"max_sequence_length": text["prompt_embeds"].shape[1]}

    def guidance_kwargs(self, pipe, scale: float | None) -> dict[str, Any]:
        # `guidance_scale` is for guidance-distilled variants only
        return {"true_cfg_scale": self.default_guidance if scale is None else scale}

    def encode_latents(self, vae, pixel_values: torch.Tensor) -> torch.Tensor:
        return image_latents(vae, pixel_values.to(vae.device, vae.dtype))

    def predict(self, denoiser, noisy, timesteps, text, batch) -> torch.Tensor:
        from diffusers import QwenImagePipeline

        b, c, h, w = noisy.shape
        packed = QwenImagePipeline._pack_latents(noisy, b, c, h, w)
        out = denoiser(hidden_states=packed, timestep=timesteps / 1000, encoder_hidden_states=text["prompt_embeds"],
                       encoder_hidden_states_mask=text["prompt_embeds_mask"].bool(),
                       img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
        # vae_scale_factor 1 makes _unpack_latents take latent-space sizes; it returns one frame: [B, C, 1, H, W]
        return QwenImagePipeline._unpack_latents(out, h, w, 1).squeeze(2)

    def unused_modules(self, denoiser) -> list[str]:
        """The last block's text-stream outputs: the image stream is all the final layer reads."""
        import torch

        inner = getattr(getattr(denoiser, "module", denoiser), "_orig_mod", getattr(denoiser, "module", denoiser))
        last = f"transformer_blocks.{len(inner.transformer_blocks) - 1}"
        return [n for n, m in inner.named_modules() if isinstance(m, torch.nn.Linear)
                and (n.startswith(f"{last}.attn.to_add_out") or n.startswith(f"{last}.txt_mlp."))]

    def check_recipe(self, recipe) -> None:
        super().check_recipe(recipe)
        if (recipe.model.max_sequence_length or 0) > MAX_TOKENS:
            raise ValueError(f"model.max_sequence_length: Qwen-Image reads at most {MAX_TOKENS} caption tokens "
                             f"(got {recipe.model.max_sequence_length}); lower it")


QWEN_IMAGE = QwenImageFamily("qwen_image", **llm_flow_transformer(
    pipeline_class="QwenImagePipeline",
    denoiser_class="QwenImageTransformer2DModel",
    # logit-normal timesteps shifted by image size as Qwen-Image samples (its scheduler's exponential shift,
    # mu from 0.5 at 256 tokens to 0.9 at 8192); diffusers' script trains on the unshifted grid
    flow_defaults={"sampling": "logit_normal", "resolution_shift": True},
    patch_size=2,
    # ComfyUI (comfy/lora.py, QwenImage branch) names the model as diffusers does and maps
    # 'lycoris_<path with _>' (SimpleTuner), 'transformer.<path>' and the bare path
    kohya_names={"transformer": ModuleNames("lycoris", words=QWEN_IMAGE_WORDS)},
    base_version="qwen_image",
    modelspec_arch={"flow": "qwen-image"},
    lora_presets=QWEN_IMAGE_PRESETS,
    default_guidance=4.0,
    frozen_text_encoder="Qwen2.5-VL-7B",
    text_masks={"prompt_embeds_mask": "long"},
))


def image_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Images [B, C, H, W] through a Qwen-Image-style video VAE as one frame: the mode, normalised per channel
    with the VAE's latents_mean / latents_std, as the pipelines' `_encode_vae_image` does."""
    import torch

    z = vae.encode(pixels.unsqueeze(2)).latent_dist.mode().float()  # one frame: [B, C, 1, H, W]
    mean = torch.tensor(vae.config.latents_mean, device=z.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=z.device).view(1, -1, 1, 1, 1)
    return ((z - mean) / std).squeeze(2)
