"""SD 1.x and SDXL with a ControlNet: a `ControlNetModel` beside the frozen U-Net, driven exactly as
`StableDiffusionControlNetPipeline` / `StableDiffusionXLControlNetPipeline` drive them:

- the ControlNet takes the U-Net's noisy latents, timestep, text (SDXL: and size/crop conditioning), plus the control
  image itself in [0, 1] at the image's resolution (`controlnet_cond`; the pipeline's control image processor does
  not normalise); its down and mid residuals are added inside the U-Net;
- it starts as diffusers' train_controlnet(_sdxl).py makes it: `ControlNetModel.from_unet`, the encoder copied from
  the U-Net and every residual projection zero, so training starts from the base's output. Its conditioning
  embedding downsamples as often as the VAE does (SDXL: 8x, the diffusers default of four conv widths).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from finetune.models.families.sd import SD1, SDFamily
from finetune.models.families.sdxl import SDXL, SDXLFamily

#: diffusers' widths of the conditioning embedding's convolutions (one per halving, plus the first)
EMBEDDING_WIDTHS = (16, 32, 96, 256)


class UNetControlNet:
    """What a U-Net family's ControlNet variant adds (mixed in before the family's own class)."""

    #: the diffusers class of its ControlNet (what an exported one loads as)
    controlnet_class = "ControlNetModel"

    def matches(self, model_index, denoiser_config, text_encoder_config) -> bool:
        return False  # a base with a ControlNet is its base's family; a controlnet method makes this one

    def make_controlnet(self, denoiser, vae, layers: int | None, single_layers: int | None):
        """A ControlNet initialised from the U-Net's encoder (`layers`: transformers only)."""
        from diffusers import ControlNetModel

        halvings = len(vae.config.block_out_channels) - 1
        return ControlNetModel.from_unet(denoiser, conditioning_embedding_out_channels=EMBEDDING_WIDTHS[: halvings + 1])

    def edit_kwargs(self, images, size) -> dict[str, Any]:
        return {"image": images[0]}

    def predict(self, denoiser, noisy, timesteps, text, batch):
        (control,) = batch["references"]  # pixels in [-1, 1] (control_pixels)
        kwargs = self.unet_kwargs(text, batch)
        net = batch["modules"]["controlnet"]
        down, mid = net(noisy, timesteps, controlnet_cond=(control.to(noisy) + 1) / 2, conditioning_scale=1.0,
                        guess_mode=False, return_dict=False, **kwargs)
        return denoiser(noisy, timesteps, **kwargs, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid, return_dict=False)[0]


@dataclass(frozen=True)
class SDControlNetFamily(UNetControlNet, SDFamily):
    pass


@dataclass(frozen=True)
class SDXLControlNetFamily(UNetControlNet, SDXLFamily):
    pass


def _variant(cls, family, name: str, pipeline: str):
    return cls(**{**{f.name: getattr(family, f.name) for f in fields(family)}, "name": name,
                  "pipeline_class": pipeline, "edit_pipeline_class": pipeline, "max_conditions": 1,
                  "control_pixels": True, "controlnet_family": None, "single_file_signs": ()})


SD1_CONTROLNET = _variant(SDControlNetFamily, SD1, "sd1_controlnet", "StableDiffusionControlNetPipeline")
SDXL_CONTROLNET = _variant(SDXLControlNetFamily, SDXL, "sdxl_controlnet", "StableDiffusionXLControlNetPipeline")
