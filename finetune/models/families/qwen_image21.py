"""Qwen-Image 2.1 (Qwen): a single-stream, block-causal transformer (`QwenImage21Transformer2DModel`: text and the
target image in one sequence, the text causal, each image block bidirectional, one shared modulation) on a 16x
VAE with 64 latent channels that reads RGBA, conditioned by a frozen Qwen3-VL, trained with rectified flow and
driven as `QwenImage21Pipeline` drives it:

- text: the pipeline's own `_get_qwen_prompt_embeds` for text-only prompts, one caption at a time (exactly what
  the pipeline computes for a single prompt): its chat template, Qwen3-VL's last decoder state before the final
  norm, the system tokens dropped. Batched, the pipeline pads prompts to the longest and the padding moves the
  target image's rotary frame position, so each caption is encoded alone and stored right-padded with zeros to
  `max_sequence_length` (512) with its mask, which `predict` cuts back off (captions longer than that keep their
  first 512 states);
- latents: the VAE's mode of the image as RGBA (an opaque alpha channel, as the pipeline's `convert("RGBA")`
  gives), normalised per channel `(z - latents_mean) / latents_std`; packed as one token per latent pixel
  (`_pack_latents`, patch 1);
- timestep: sigma (t / 1000); the transformer sees the text, then the target's tokens (`img_mask`: one VLM slot per
  2x2 tokens, `img_shapes`: (1, h, w)), and its output's last h * w tokens are the flow velocity (noise - x0).
  `predict` calls it once per sample, each with its own caption length, as the pipeline does for one prompt
  (the transformer takes one token layout per call).

Text-only encoding without torchvision, a decision: the pipeline's processor is a Qwen3VLProcessor, whose video
processor needs torchvision (no CPU build here). For prompts without images the pipeline uses the processor's
tokenizer and chat template only, so the family loads the processor without its video processor
(`text_processor`, the same class otherwise: the pipeline's own code runs on it); the image-conditioned mode is
not trained here.

Objective: logit-normal sigmas shifted by image size with the pipeline's rule (`calculate_shift` over the
scheduler config: mu 0.5 at 256 tokens to 1.15 at 4096, one token per 16x16 pixels), as Qwen-Image. Qwen has
published no training recipe I could read. Guidance: the pipeline's `true_cfg_scale`, 1.0 (off) by default.
ComfyUI: the comfy/lora.py I could read has no Qwen-Image 2.1 model, so no UI key table is claimed; the exports are
the diffusers file (QwenImageLoraLoaderMixin loads it) and a kohya file of diffusers names for this project's
converter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finetune.export.layouts import TRANSFORMER_WORDS, ModuleNames
from finetune.models.family import Family, llm_flow_transformer
from finetune.models.sampling import Sampling

if TYPE_CHECKING:
    import torch

MASK = "prompt_embeds_mask"
SLOT = 4  # latent tokens per VLM image slot (2x2): QwenImage21Transformer2DModel's _IMG_TOKENS_PER_SLOT

ATTENTION = r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)"
QWEN_IMAGE21_PRESETS: dict[str, list[str] | str] = {
    # every block's q/k/v/out (the blocks hold no modulation of their own)
    "attention": ATTENTION,
    # + the SwiGLU feed-forward (proj, gate_layer, out): every linear of every block
    "attention_mlp": r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0)|img_mlp\.(proj|gate_layer|out))",
}
QWEN_IMAGE21_WORDS = TRANSFORMER_WORDS + ("img_mlp", "gate_layer", "txt_in", "img_in")

_PROCESSOR: list = []


def text_processor():
    """Qwen3VLProcessor with its image processor and tokenizer, no video processor: loadable without torchvision,
    and all the text-only pipeline uses of it (the chat template, the tokenizer)."""
    if not _PROCESSOR:
        from transformers import Qwen3VLProcessor

        class TextQwen3VLProcessor(Qwen3VLProcessor):
            def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
                super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

        # saved pipelines (a full fine-tune's export) name it as the base does: transformers' Qwen3VLProcessor
        TextQwen3VLProcessor.__module__ = "transformers"
        TextQwen3VLProcessor.__name__ = TextQwen3VLProcessor.__qualname__ = "Qwen3VLProcessor"
        _PROCESSOR.append(TextQwen3VLProcessor)
    return _PROCESSOR[0]


@dataclass(frozen=True)
class QwenImage21Family(Family):
    def load_component(self, name: str, where: str, revision: str | None = None):
        if name != "processor":
            return None
        processor = text_processor().from_pretrained(where, subfolder=name, revision=revision)
        # it stands where the other families have a tokenizer (the text cache is keyed on the tokenizer's name)
        processor.name_or_path = processor.tokenizer.name_or_path
        return processor

    def text_only_pipeline(self, comps):
        from diffusers import QwenImage21Pipeline

        return QwenImage21Pipeline(scheduler=None, vae=None, text_encoder=comps.encoder("text_encoder"),
                                   processor=comps.tokenizer_for("text_encoder"), transformer=None)

    def encode_prompt(self, comps, captions: list[str], device: Any) -> dict[str, torch.Tensor]:
        import torch

        pipe, length = self.text_only_pipeline(comps), self.sequence_length(comps)
        states = []
        for caption in captions:  # one at a time: the pipeline's single-prompt encoding, unpadded
            embeds, _, _ = pipe._get_qwen_prompt_embeds([caption], None, device)
            states.append(embeds[0, :length])
        embeds = torch.stack([torch.cat([s, s.new_zeros(length - s.shape[0], s.shape[1])]) for s in states])
        mask = torch.stack([torch.arange(length, device=s.device) < s.shape[0] for s in states]).long()
        return {"prompt_embeds": embeds, MASK: mask}

    def pipeline_prompt_kwargs(self, text, negative) -> dict[str, Any]:
        """The embeddings cut to the longest caption of the batch (what the pipeline pads a batch to): a single
        prompt gets no padding at all, as the pipeline encodes it."""
        kwargs = {}
        for prefix, part in (("", text), ("negative_", negative)):
            if part is not None:
                n = int(part[MASK].sum(1).max())
                kwargs |= {f"{prefix}prompt_embeds": part["prompt_embeds"][:, :n],
                           f"{prefix}prompt_embeds_mask": part[MASK][:, :n].long()}
        return kwargs

    def guidance_kwargs(self, pipe, scale: float | None) -> dict[str, Any]:
        return {"true_cfg_scale": self.default_guidance if scale is None else scale}

    def encode_latents(self, vae, pixel_values: torch.Tensor) -> torch.Tensor:
        """RGB images as the VAE's RGBA input (alpha 1: opaque, as the pipeline's `convert("RGBA")` makes them),
        the mode, normalised per channel as the pipeline's `_encode_vae_image` does."""
        import torch

        from finetune.models.families.qwen_image import image_latents

        pixels = pixel_values.to(vae.device, vae.dtype)
        if pixels.shape[1] == 3 and vae.config.in_channels == 4:
            pixels = torch.cat([pixels, torch.ones_like(pixels[:, :1])], dim=1)
        return image_latents(vae, pixels)

    def predict(self, denoiser, noisy, timesteps, text, batch) -> torch.Tensor:
        import torch
        from diffusers import QwenImage21Pipeline

        b, c, h, w = noisy.shape
        packed = QwenImage21Pipeline._pack_latents(noisy, b, c, h, w)
        embeds, mask = text["prompt_embeds"], text[MASK]
        # on the meta device (the memory estimate) no length can be read: every caption is taken at full length
        lengths = [embeds.shape[1]] * b if mask.is_meta else mask.sum(1).tolist()
        out = []
        for i, n in enumerate(int(n) for n in lengths):
            slots = torch.zeros(1, n + h * w // SLOT, dtype=torch.bool, device=noisy.device)
            slots[:, n:] = True  # the target image's slots after the caption (the pipeline's append_target_slots)
            pred = denoiser(hidden_states=packed[i:i + 1], timestep=timesteps[i:i + 1] / 1000,
                            encoder_hidden_states=embeds[i:i + 1, :n], img_shapes=[[(1, h, w)]], img_mask=slots,
                            return_dict=False)[0]
            out.append(pred[:, -h * w:])
        return torch.cat(out).transpose(1, 2).reshape(b, c, h, w)


QWEN_IMAGE21 = QwenImage21Family("qwen_image21", **llm_flow_transformer(
    pipeline_class="QwenImage21Pipeline",
    denoiser_class="QwenImage21Transformer2DModel",
    tokenizer_names=("processor",),  # the pipeline's processor holds the tokenizer and the chat template
    # logit-normal sigmas shifted by image size, the pipeline's rule over its scheduler config
    flow_defaults={"sampling": "logit_normal", "resolution_shift": True},
    patch_size=1,
    kohya_names={"transformer": ModuleNames("lora_transformer", words=QWEN_IMAGE21_WORDS)},
    extra_parts=("processor",),
    pipeline_config_keys=("sample_sigmas",),  # the author's sampling sigmas, kept with the base
    base_version="qwen_image21",
    modelspec_arch={"flow": "qwen-image-2.1"},
    lora_presets=QWEN_IMAGE21_PRESETS,
    text_masks={MASK: "long"},
    default_guidance=1.0,  # the pipeline's true_cfg_scale default (no CFG)
    frozen_text_encoder="Qwen3-VL",
    sampling=Sampling(40, 1.0, what="Qwen-Image 2.1"),  # the pipeline's defaults
))
