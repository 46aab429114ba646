"""`control_lora`: a LoRA that teaches a base to follow a control image (edges, depth, a mask) through a widened
input projection, the FLUX.1 Canny / Depth [dev] LoRA recipe (diffusers' train_control_lora_flux.py).

The base's family names the control variant it becomes (`Family.control_family`: FLUX.1 -> flux_control), which
widens the input projection for the control latents (new columns zero: training starts from the base's output)
and concatenates them with the noisy latents as its control pipeline does. The widened projection stays frozen;
the LoRA reaches it too (its down-projection reads both halves), so the LoRA file alone carries everything:
diffusers' loader widens the projection of a stock base the same way when the file's shapes ask for it.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from finetune.methods.base import register_method
from finetune.methods.lora import LoRAConfig, LoRAMethod


@register_method
class ControlLoRAConfig(LoRAConfig):
    name: Literal["control_lora"] = "control_lora"  # type: ignore[assignment]
    # the widened input is read by diffusers' loader only: the UI layouts have no place for it
    export_formats: ClassVar[frozenset[str]] = frozenset({"diffusers"})

    targets: str | list[str] = Field(
        "attention", description="Denoiser modules besides the input projection (always adapted): a preset of "
        "the family or a list of module-name suffixes.",
    )
    train_norm_layers: bool = Field(
        False, description="Also train the attention's q/k norm scales whole (norm_q, norm_k, norm_added_q, "
        "norm_added_k), as diffusers' train_control_lora_flux.py --train_norm_layers does; they go into the LoRA "
        "file, and FluxControlPipeline.load_lora_weights writes them into the transformer.",
    )

    def check_recipe(self, recipe) -> None:
        super().check_recipe(recipe)
        cond = recipe.data.conditioning
        if cond is None or cond.role != "spatial" or cond.count != 1:
            raise ValueError("method.name: control_lora trains on pairs of a target and one control image that "
                             "follows its crop and flip: set data.conditioning: {count: 1, role: spatial}")
        if self.text_encoder.enabled:
            raise ValueError("method.text_encoder.enabled: control_lora trains the denoiser only; set it false")

    def check_family(self, recipe, family) -> None:
        super().check_family(recipe, family)
        if family.control_family is None and not hasattr(family, "widen_input"):
            raise ValueError(f"method.name: control_lora needs a base whose input can be widened for a control "
                             f"image (FLUX.1); the {family.name} family has none: use controlnet")

    def conditioning_family(self, family):
        from finetune.models.families import FAMILIES

        return FAMILIES.get(family.control_family or "", family)

    def build(self):
        return ControlLoRAMethod(self)


class ControlLoRAMethod(LoRAMethod):
    """The base becomes its family's control variant (widened input), then a LoRA reaches the input too."""

    def setup(self, comps, train_lr: float) -> list[dict]:
        from finetune.models.families import FAMILIES

        if comps.family.control_family is not None:
            comps.family = FAMILIES[comps.family.control_family]
        self.input_name = comps.family.widen_input(comps.denoiser)
        groups = super().setup(comps, train_lr)
        self.norms = norm_parameters(comps.denoiser) if self.config.train_norm_layers else {}
        if self.config.train_norm_layers and not self.norms:
            from finetune.errors import ModelError

            raise ModelError(f"method.train_norm_layers: the {comps.family.name} denoiser has no q/k norm layers "
                             "to train; set it false")
        for p in self.norms.values():
            p.requires_grad_(True)
        return groups + ([{"params": list(self.norms.values()), "lr": train_lr}] if self.norms else [])

    def trainable_state(self, comps) -> dict:
        return super().trainable_state(comps) | self.norm_state(comps)

    def norm_state(self, comps) -> dict:
        """The trained norm scales, '<denoiser>.<parameter path>' (what diffusers' loader reads)."""
        return {f"{comps.family.denoiser_name}.{n}": p for n, p in getattr(self, "norms", {}).items()}

    def export(self, comps, out_dir, ctx) -> list:
        from finetune.export.lora import export_lora

        return export_lora(comps, self, out_dir, ctx, replaced=self.norm_state(comps))

    def denoiser_targets(self, comps) -> list[str] | str:
        import re

        targets = super().denoiser_targets(comps)
        if isinstance(targets, str):  # a regex peft full-matches: the input projection as one more alternative
            return f"(?:{targets})|{re.escape(self.input_name)}"
        return [*targets, self.input_name]


def norm_parameters(denoiser) -> dict:
    """The weights of the denoiser's attention q/k norms (finetune.export.layers.REPLACED_MODULES), by name."""
    from finetune.export.layers import REPLACED_MODULES

    return {n: p for n, p in denoiser.named_parameters()
            if n.endswith(".weight") and n.rsplit(".", 2)[-2] in REPLACED_MODULES}
