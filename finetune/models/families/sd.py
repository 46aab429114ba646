"""Stable Diffusion 1.x and 2.x: a U-Net over one CLIP-style text encoder's last hidden state, DDPM objective.

SD 2.x shares SD 1.x's code path; what differs is the text encoder (OpenCLIP-H) and, for the 768 px models,
v-prediction, which is a scheduler setting of the base.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune.export.ldm import OpenClipCheckpoint
from finetune.models.family import UNET_BLOCKS, Family

# LoRA target presets for SD-style U-Nets (module-name suffixes as peft matches them)
UNET_PRESETS: dict[str, list[str]] = {
    # the diffusers default: attention projections only
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    # + transformer feed-forward and the 1x1 projections into/out of each transformer block
    "attention_ff": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"],
    # LoCon: + the ResNet convolutions, time-embedding projections and shortcut convs
    "locon": [
        "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
        "conv1", "conv2", "conv_shortcut", "time_emb_proj",
    ],
}
SD_SINGLE_FILE = {"sd1": ("cond_stage_model.transformer.",), "sd2": ("cond_stage_model.model.",)}


@dataclass(frozen=True)
class SDFamily(Family):
    compile_blocks: tuple[str, ...] = UNET_BLOCKS
    def matches(self, model_index: dict[str, Any], denoiser_config: dict[str, Any],
                text_encoder_config: dict[str, Any]) -> bool:
        if not super().matches(model_index, denoiser_config, text_encoder_config):
            return False
        openclip = (denoiser_config.get("cross_attention_dim") == 1024
                    or text_encoder_config.get("hidden_act") == "gelu")
        return openclip if self.name == "sd2" else True  # sd1 is the U-Net fallback (lowest priority)


SD1 = SDFamily("sd1", lora_presets=UNET_PRESETS, single_file_signs=SD_SINGLE_FILE["sd1"],
               controlnet_family="sd1_controlnet")  # controlnet trains a ControlNetModel beside it
SD2 = SDFamily(
    "sd2",
    lora_presets=UNET_PRESETS,
    single_file_signs=SD_SINGLE_FILE["sd2"],
    # OpenCLIP-H: original checkpoints keep open_clip's own names (fused attention in_proj)
    single_file_text={"text_encoder": OpenClipCheckpoint("cond_stage_model.model.")},
    base_version="sd_v2",
    ss_v2=True,
    modelspec_arch={"epsilon": "stable-diffusion-v2-512", "v_prediction": "stable-diffusion-v2-768-v"},
    priority=10,
)
