"""FLUX.1 Control (the Canny / Depth [dev] recipe): a FLUX.1 transformer whose input projection reads the control
image's latents beside the noisy ones, driven exactly as `FluxControlPipeline` drives it:

- the control image's latents are packed in 2x2 patches like the target's and concatenated on the feature axis
  (`torch.cat([latents, control], dim=2)`, the pipeline's denoising loop), so the sequence keeps the target's
  length and position ids; the input projection (`x_embedder`) takes twice the features;
- text, timesteps and the distilled guidance input are FLUX.1's (the flux family's); the pipeline has no true
  classifier-free guidance and takes no negative prompt.

A base becomes this family when a control method widens its input projection (`widen_input`, what diffusers'
train_control_lora_flux.py does: the new columns zero, so the widened model starts as the base); a base already
saved in FluxControlPipeline form (FLUX.1 Canny / Depth [dev]) is detected as it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from finetune.models.families.flux import FLUX, FluxFamily, denoiser_config

if TYPE_CHECKING:
    import torch

PIPELINE = "FluxControlPipeline"
#: the input projection a control method widens (diffusers' loader expands the same module when it loads one)
INPUT = "x_embedder"


class ControlPipelineCalls:
    """How FLUX.1's control pipelines (FluxControlPipeline, FluxControlNetPipeline) are called: a `control_image`,
    [dev]'s distilled guidance, no true classifier-free guidance and no negative prompt."""

    def guidance_kwargs(self, pipe, scale: float | None) -> dict[str, Any]:
        """[dev]'s distilled guidance; a transformer without one (the toy) samples unguided."""
        if denoiser_config(pipe.transformer).get("guidance_embeds"):
            return {"guidance_scale": self.default_guidance if scale is None else scale}
        return {}

    def pipeline_prompt_kwargs(self, text, negative) -> dict[str, Any]:
        return {"prompt_embeds": text["prompt_embeds"], "pooled_prompt_embeds": text["pooled_prompt_embeds"]}

    def edit_kwargs(self, images, size) -> dict[str, Any]:
        return {"control_image": images[0]}


@dataclass(frozen=True)
class FluxControlFamily(ControlPipelineCalls, FluxFamily):
    def matches(self, model_index, denoiser_config, text_encoder_config) -> bool:
        return model_index.get("_class_name") == PIPELINE and super().matches(
            model_index, denoiser_config, text_encoder_config)

    def widen_input(self, denoiser) -> str:
        """Double the input projection's features for the control latents (new columns zero: the model's output
        is the base's until something trains them) and record it in the config as the pipeline reads it
        (`in_channels // 8` latent channels). Returns the module's name, for the adapter to reach it."""
        import torch

        old = getattr(denoiser, INPUT)
        channels = denoiser.config.in_channels
        if old.in_features != channels:
            return INPUT  # already widened (a FluxControlPipeline base)
        new = torch.nn.Linear(2 * channels, old.out_features, bias=old.bias is not None, dtype=old.weight.dtype,
                              device=old.weight.device)
        with torch.no_grad():
            new.weight.zero_()
            new.weight[:, :channels].copy_(old.weight)
            if old.bias is not None:
                new.bias.copy_(old.bias)
        new.requires_grad_(False)
        setattr(denoiser, INPUT, new)
        denoiser.register_to_config(in_channels=2 * channels, out_channels=denoiser.config.out_channels or channels)
        return INPUT

    def reads_control(self, adapter, denoiser) -> bool:
        """Whether a LoRA file (finetune.export.layers.Adapter) is a Control LoRA for this base: its layer on the
        input projection reads more features than the base's input has (the control latents too), the shapes
        diffusers' loader widens a stock base for."""
        layer = adapter.layers.get(f"{self.denoiser_name}.{INPUT}")
        down = None if layer is None else layer.tensors.get("lora_A.weight")
        return down is not None and down.shape[1] > getattr(denoiser, INPUT).in_features

    def pack_inputs(self, tokens, batch) -> torch.Tensor:
        """The target's tokens with the control image's latents packed alike beside them on the feature axis."""
        import torch
        from diffusers import FluxControlPipeline

        (control,) = batch["references"]
        return torch.cat([tokens, FluxControlPipeline._pack_latents(control.to(tokens.dtype), *control.shape)], dim=2)

    def references(self, batch) -> list:
        return []  # the control rides every token; nothing is appended


FLUX_CONTROL = FluxControlFamily(**{
    **{f.name: getattr(FLUX, f.name) for f in fields(FLUX)},
    "name": "flux_control",
    "pipeline_class": PIPELINE,
    "edit_pipeline_class": PIPELINE,
    "control_family": None,  # it is one
    "controlnet_family": None,
    "modelspec_arch": {"flow": "flux-1-dev-control"},
    "single_file_signs": (),
    "priority": FLUX.priority + 10,  # asked before flux, whose transformer class it shares
})
