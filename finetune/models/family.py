"""Model families: what differs between SD 1.x, SD 2.x and SDXL, asked for by the trainer and exporters.

The trainer never branches on a family name: it calls `encode_prompt` and `unet_kwargs`, and the exporters
read the family's tables: `kohya_names` (LoRA keys for ComfyUI / AUTOMATIC1111), `single_file_text` (how an
original checkpoint stores the text encoders), `embedding_keys` and the metadata ids. A family is detected from the base (finetune/models/detect.py)
or set in the recipe (`model.family`).

SD 2.x shares SD 1.x's code path (one CLIP-style encoder, last hidden state); what differs is the text
encoder (OpenCLIP-H) and, for the 768 px models, v-prediction, which is a scheduler setting of the base.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from finetune.export.layouts import ClipNames, ModuleNames, UNetGeometry, UNetNames
from finetune.export.ldm import ClipCheckpoint, OpenClipCheckpoint

if TYPE_CHECKING:
    import torch

    from finetune.models.components import Components


# the U-Net block layout of the real models (what a LoRA file for them is named after)
SD_GEOMETRY = UNetGeometry(layers_per_block=2, up_attention=(False, True, True, True))
SDXL_GEOMETRY = UNetGeometry(layers_per_block=2, up_attention=(True, True, False))


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_class: str = "StableDiffusionPipeline"
    text_encoder_names: tuple[str, ...] = ("text_encoder",)
    tokenizer_names: tuple[str, ...] = ("tokenizer",)
    #: how each trainable component is named in kohya/LyCORIS LoRA keys (ComfyUI / A1111 LoRA files)
    kohya_names: dict[str, ModuleNames] = field(default_factory=lambda: {
        "unet": UNetNames("lora_unet", style="diffusers", geometry=SD_GEOMETRY),
        "text_encoder": ClipNames("lora_te", also=("lora_te1",)),
    })
    #: how an original single-file checkpoint stores each text encoder
    single_file_text: dict[str, Any] = field(
        default_factory=lambda: {"text_encoder": ClipCheckpoint("cond_stage_model.transformer.")}
    )
    #: `ss_base_model_version` of kohya metadata (A1111 reads it, with `ss_v2`, to sort LoRAs by base)
    base_version: str = "sd_v1"
    ss_v2: bool = False
    #: `modelspec.architecture` per prediction type (Stability's model spec ids)
    modelspec_arch: dict[str, str] = field(
        default_factory=lambda: {"epsilon": "stable-diffusion-v1", "v_prediction": "stable-diffusion-v1"}
    )
    #: prompt weighting (tools/generate.py): the hidden state the U-Net reads, and whether the last encoder's
    #: pooled output conditions it too
    prompt_layer: str = "last"
    pooled_prompt: bool = False
    #: key of each text encoder's vectors in A1111 / ComfyUI embedding files
    embedding_keys: dict[str, str] = field(default_factory=lambda: {"text_encoder": "emb_params"})
    #: the VAE overflows in fp16 (SDXL): keep it in fp32 unless the recipe says otherwise
    vae_fp16_unsafe: bool = False
    #: extra constructor arguments of `pipeline_class` when we assemble it from components
    pipeline_kwargs: dict[str, Any] = field(
        default_factory=lambda: {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    )

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


@dataclass(frozen=True)
class SDXLFamily(Family):
    """Two text encoders (CLIP-L and OpenCLIP-bigG with a projection), pooled text embeddings and the
    size/crop micro-conditioning; computed exactly as diffusers' StableDiffusionXLPipeline does, so what
    trains is what the pipeline (and the validation grids) will feed the U-Net."""

    def encode_prompt(self, comps: Components, captions: list[str], device: Any) -> dict[str, torch.Tensor]:
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


SD1 = Family("sd1")
SD2 = Family(
    "sd2",
    # OpenCLIP-H: original checkpoints keep open_clip's own names (fused attention in_proj)
    single_file_text={"text_encoder": OpenClipCheckpoint("cond_stage_model.model.")},
    base_version="sd_v2",
    ss_v2=True,
    modelspec_arch={"epsilon": "stable-diffusion-v2-512", "v_prediction": "stable-diffusion-v2-768-v"},
)
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
)
FAMILIES: dict[str, Family] = {f.name: f for f in (SD1, SD2, SDXL)}


def family_from_configs(model_index: dict[str, Any], unet_config: dict[str, Any],
                        text_encoder_config: dict[str, Any] | None = None) -> Family:
    """The family of a diffusers model from its model_index.json, unet/config.json and (optionally)
    text_encoder/config.json. Real signals only: SDXL has a second text encoder and the U-Net's
    'text_time' added conditioning; SD 2.x has an OpenCLIP text encoder (gelu activation, where OpenAI's
    CLIP uses quick_gelu) and, at full size, 1024-wide cross-attention."""
    if "text_encoder_2" in model_index or unet_config.get("addition_embed_type") == "text_time":
        if "text_encoder" in model_index and _missing(model_index["text_encoder"]):
            raise NotImplementedError("an SDXL refiner (one OpenCLIP text encoder) is not supported; "
                                      "use an SDXL base model")
        return SDXL
    if unet_config.get("cross_attention_dim") == 1024:
        return SD2
    if (text_encoder_config or {}).get("hidden_act") == "gelu":
        return SD2
    return SD1


def _missing(entry: Any) -> bool:
    """A model_index entry that names no component: absent, null or [null, null] (an SDXL refiner's)."""
    return entry is None or (isinstance(entry, (list, tuple)) and not any(entry))
