"""SDXL: a U-Net over two text encoders (CLIP-L and OpenCLIP-bigG with a projection), pooled text embeddings
and the size/crop micro-conditioning; computed exactly as diffusers' StableDiffusionXLPipeline does, so what
trains is what the pipeline (and the validation grids) will feed the U-Net."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finetune.export.layouts import ClipNames, UNetNames
from finetune.export.ldm import ClipCheckpoint, OpenClipCheckpoint
from finetune.models.families.sd import UNET_PRESETS
from finetune.models.family import SDXL_GEOMETRY, UNET_BLOCKS, Family

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SDXLFamily(Family):
    compile_blocks: tuple[str, ...] = UNET_BLOCKS
    def matches(self, model_index: dict[str, Any], denoiser_config: dict[str, Any],
                text_encoder_config: dict[str, Any]) -> bool:
        if not super().matches(model_index, denoiser_config, text_encoder_config):
            return False
        if "text_encoder_2" in model_index or denoiser_config.get("addition_embed_type") == "text_time":
            if "text_encoder" in model_index and _missing(model_index["text_encoder"]):
                raise NotImplementedError("an SDXL refiner (one OpenCLIP text encoder) is not supported; "
                                          "use an SDXL base model")
            return True
        return False

    def encode_prompt(self, comps, captions: list[str], device: Any) -> dict[str, torch.Tensor]:
        """Penultimate hidden states of both encoders, concatenated on the feature axis (768 + 1280 = 2048
        for SDXL), and the pooled, projected output (text_embeds) of the second."""
        import torch

        hidden, pooled = [], None
        for ids, encoder in zip(self.tokenize(comps, captions), comps.text_encoders, strict=True):
            out = encoder(ids.to(device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder is a CLIPTextModelWithProjection: out[0] is text_embeds
        if pooled is None or pooled.ndim != 2:
            raise ValueError(f"{self.text_encoder_names[-1]} must return pooled text_embeds [batch, dim] "
                             "(a CLIPTextModelWithProjection), as SDXL's second text encoder does")
        return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled_prompt_embeds": pooled}

    def unet_kwargs(self, text: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, Any]:
        """+ added_cond_kwargs: pooled text and time_ids = (original h, w, crop top, left, target h, w),
        per example, from the batch (the data pipeline records them for every image)."""
        import torch

        embeds = text["prompt_embeds"]
        time_ids = torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], dim=1)
        time_ids = time_ids.to(embeds.device, embeds.dtype)
        pooled = text["pooled_prompt_embeds"].to(embeds.device)
        return {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


def _missing(entry: Any) -> bool:
    """A model_index entry that names no component: absent, null or [null, null] (an SDXL refiner's)."""
    return entry is None or (isinstance(entry, (list, tuple)) and not any(entry))


SDXL = SDXLFamily(
    "sdxl",
    pipeline_class="StableDiffusionXLPipeline",
    text_encoder_names=("text_encoder", "text_encoder_2"),
    tokenizer_names=("tokenizer", "tokenizer_2"),
    # kohya trains SDXL on the original U-Net, so SDXL LoRA keys carry LDM names (input_blocks_4_1_...)
    kohya_names={"unet": UNetNames("lora_unet", style="ldm", geometry=SDXL_GEOMETRY),
                 "text_encoder": ClipNames("lora_te1"), "text_encoder_2": ClipNames("lora_te2", wrapped=True)},
    single_file_text={"text_encoder": ClipCheckpoint("conditioner.embedders.0.transformer."),
                      "text_encoder_2": OpenClipCheckpoint("conditioner.embedders.1.model.")},
    base_version="sdxl_base_v1-0",
    modelspec_arch={"epsilon": "stable-diffusion-xl-v1-base", "v_prediction": "stable-diffusion-xl-v1-base"},
    prompt_layer="penultimate",
    pooled_prompt=True,
    embedding_keys={"text_encoder": "clip_l", "text_encoder_2": "clip_g"},
    vae_fp16_unsafe=True,
    # no invisible watermark on validation grids (and no dependency on the package for them)
    pipeline_kwargs={"add_watermarker": False},
    lora_presets=UNET_PRESETS,
    single_file_signs=("conditioner.embedders.1.model.",),
    controlnet_family="sdxl_controlnet",  # controlnet trains a ControlNetModel beside it
    priority=20,
)
