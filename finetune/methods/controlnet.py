"""`controlnet`: a ControlNet trained beside the frozen base, initialised from the base's own blocks as diffusers'
reference scripts do (train_controlnet_flux.py: `FluxControlNetModel.from_transformer`; train_controlnet_sdxl.py:
`ControlNetModel` built from the base's own denoiser), its outputs zero at the start so training begins at the base's prediction.

The base's family names its ControlNet variant (`Family.controlnet_family`), which builds the ControlNet
(`make_controlnet`) and feeds it as the stock ControlNet pipeline does; the ControlNet is added to the components
(`Components.added`), so the trainer trains it, checkpoints it and hands it to the pipelines like any other part.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from finetune.methods.base import MethodConfig, register_method

NAME = "controlnet"  # its pipeline component name


@register_method
class ControlNetConfig(MethodConfig):
    name: Literal["controlnet"] = "controlnet"
    #: diffusers: a ControlNet folder the stock pipelines load; single_file: the same tensors in one file (ComfyUI)
    export_formats: ClassVar[frozenset[str]] = frozenset({"diffusers", "single_file"})

    layers: int | None = Field(None, ge=1, description="Transformers: double-stream blocks the ControlNet copies "
                               "from the base (null: all of them; diffusers' FLUX script uses 4). U-Nets: unused.")
    single_layers: int | None = Field(None, ge=0, description="Transformers: single-stream blocks copied (null: "
                                      "all; diffusers' FLUX script uses 10). U-Nets: unused.")

    def check_recipe(self, recipe) -> None:
        cond = recipe.data.conditioning
        if cond is None or cond.role != "spatial" or cond.count != 1:
            raise ValueError("method.name: controlnet trains on pairs of a target and one control image that "
                             "follows its crop and flip: set data.conditioning: {count: 1, role: spatial}")
        if recipe.validation.prompts and not recipe.validation.images:
            raise ValueError("validation.images: a ControlNet renders with a control image; give one per prompt "
                             "(or one for all)")

    def check_family(self, recipe, family) -> None:
        if family.controlnet_family is None:
            raise ValueError(f"method.name: controlnet is not available for the {family.name} family (README's "
                             "family table lists those with one)")
        if self.conditioning_family(family).control_pixels and recipe.data.cache_latents:
            raise ValueError(f"data.cache_latents: a {family.name} ControlNet reads the control image's pixels, "
                             "which the latent cache does not keep; set data.cache_latents: false")

    def conditioning_family(self, family):
        from finetune.models.families import FAMILIES

        return FAMILIES.get(family.controlnet_family or "", family)

    def build(self):
        return ControlNetMethod(self)


class ControlNetMethod:
    """Adds the family's ControlNet to the components and trains all of it; the base stays frozen."""

    def __init__(self, config: ControlNetConfig):
        self.config = config

    def setup(self, comps, train_lr: float) -> list[dict]:
        import torch

        from finetune.models.families import FAMILIES

        comps.family = FAMILIES[comps.family.controlnet_family]
        net = comps.family.make_controlnet(comps.denoiser, comps.vae, self.config.layers, self.config.single_layers)
        net.to(torch.float32).requires_grad_(True)
        comps.added[NAME] = net
        return [{"params": list(net.parameters()), "lr": train_lr}]

    def trained_modules(self) -> list[str]:
        return [NAME]

    def after_step(self, comps) -> None:
        pass

    def trainable_state(self, comps) -> dict:
        return {f"{NAME}.{k}": v for k, v in comps.added[NAME].state_dict().items()}

    def export(self, comps, out_dir, ctx) -> list:
        from finetune.export.controlnet import export_controlnet

        return export_controlnet(comps.added[NAME], out_dir, ctx)
