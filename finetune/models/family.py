"""Model families: what differs between SD 1.x, SD 2.x and SDXL, asked for by the trainer and exporters.

The trainer never branches on a family name: it calls `encode_prompt` and `unet_kwargs`, and the exporters
read `kohya_prefixes`. A family is detected from the base (`detect_family`) or set in the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from finetune.models.components import Components


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_class: str = "StableDiffusionPipeline"
    text_encoder_names: tuple[str, ...] = ("text_encoder",)
    tokenizer_names: tuple[str, ...] = ("tokenizer",)
    #: kohya key prefix of each trained module (ComfyUI / A1111 LoRA files)
    kohya_prefixes: dict[str, str] = field(
        default_factory=lambda: {"unet": "lora_unet", "text_encoder": "lora_te"}
    )
    #: key of each text encoder's vectors in A1111 / ComfyUI embedding files
    embedding_keys: dict[str, str] = field(default_factory=lambda: {"text_encoder": "emb_params"})
    #: the VAE overflows in fp16 (SDXL): keep it in fp32 unless the recipe says otherwise
    vae_fp16_unsafe: bool = False

    def tokenize(self, comps: Components, captions: list[str]) -> list[torch.Tensor]:
        out = []
        for tok in comps.tokenizers:
            ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            out.append(ids)
        return out

    def encode_prompt(self, comps: Components, captions: list[str], device: Any) -> dict[str, torch.Tensor]:
        """Captions -> the text conditioning the U-Net takes (SD 1/2: last hidden state of one CLIP encoder)."""
        (ids,) = self.tokenize(comps, captions)
        encoder = comps.text_encoders[0]
        return {"prompt_embeds": encoder(ids.to(device), return_dict=False)[0]}

    def unet_kwargs(self, text: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments of the U-Net call besides the noisy latents and the timesteps."""
        return {"encoder_hidden_states": text["prompt_embeds"]}


SD1 = Family("sd1")
SD2 = Family("sd2")
FAMILIES: dict[str, Family] = {f.name: f for f in (SD1, SD2)}


def family_from_configs(model_index: dict[str, Any], unet_config: dict[str, Any]) -> Family:
    """Detect the family of a diffusers folder from its model_index.json and unet/config.json."""
    if "text_encoder_2" in model_index or unet_config.get("addition_embed_type") == "text_time":
        if "sdxl" in FAMILIES:
            return FAMILIES["sdxl"]
        raise NotImplementedError("SDXL bases are not supported yet")
    # SD 2.x: OpenCLIP-H text encoder (1024-wide cross-attention) and per-head attention dims
    if unet_config.get("cross_attention_dim") == 1024:
        return SD2
    return SD1
