"""`full`: the whole denoiser trains (DreamBooth's original form), optionally the text encoder(s) too.

Config is pure pydantic; torch is imported only when the method runs. Every trained weight is an fp32
parameter (the trainer's `cast_frozen` keeps trained parameters fp32 under mixed precision), so memory
is the limit: `train.gradient_checkpointing`, `train.optimizer: adamw8bit` and `train.ema` all apply.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from finetune.methods.base import MethodConfig, register_method


@register_method
class FullConfig(MethodConfig):
    name: Literal["full"] = "full"
    # a whole model: a diffusers folder, and one original-SD .safetensors for ComfyUI / A1111
    export_formats: ClassVar[frozenset[str]] = frozenset({"diffusers", "single_file"})

    train_text_encoder: bool = Field(
        False, description="Also train the whole text encoder(s): binds the identifier faster, overfits sooner."
    )
    text_encoder_lr: float | None = Field(
        None, gt=0.0, le=1.0, description="Learning rate of the text encoder(s); default train.lr."
    )

    @model_validator(mode="after")
    def _text_encoder_lr(self):
        if self.text_encoder_lr is not None and not self.train_text_encoder:
            raise ValueError("text_encoder_lr is set but train_text_encoder is false; set one or remove the other")
        return self

    def trains_text_encoder(self) -> bool:
        return self.train_text_encoder

    def trains_in_place(self) -> frozenset[str]:
        return frozenset({"denoiser", "text_encoders"} if self.train_text_encoder else {"denoiser"})

    def check_recipe(self, recipe) -> None:
        """A quantized part cannot train in place."""
        if recipe.model.quantize != "none":
            raise ValueError(f"model.quantize: {recipe.model.quantize} stores the denoiser's weights quantized, and "
                             "method 'full' trains those weights; use method lora (QLoRA) or model.quantize: none")
        if self.train_text_encoder and recipe.model.quantize_text_encoders != "none":
            raise ValueError("model.quantize_text_encoders: method 'full' with train_text_encoder trains the text "
                             "encoders' weights; set model.quantize_text_encoders: none or train_text_encoder: false")

    def check_family(self, recipe, family) -> None:
        """A family without an original single-file layout (SD3, FLUX) writes the diffusers folder only; asking
        for the single file there is refused before anything loads."""
        if family.single_file_writer:
            return
        if recipe.export.formats is None:
            recipe.export.formats = ["diffusers"]
        elif "single_file" in recipe.export.formats:
            raise ValueError(f"export.formats: 'single_file' is not written for the {family.name} family yet; "
                             "use diffusers (the model/ folder loads with from_pretrained)")

    def build(self):
        return FullMethod(self)


class FullMethod:
    """Unfreezes the denoiser (and the text encoders when asked); nothing is injected."""

    def __init__(self, config: FullConfig):
        self.config = config
        self.trained: list[str] = []

    def setup(self, comps, train_lr: float) -> list[dict]:
        cfg = self.config
        groups = []
        for name in comps.trained_experts:  # the denoiser, or each trained expert (Wan 2.2)
            comps.experts[name].requires_grad_(True)
            groups.append({"params": list(comps.experts[name].parameters()), "lr": train_lr})
        self.trained = list(comps.trained_experts)
        if cfg.train_text_encoder:
            for name, encoder in zip(comps.text_encoder_names, comps.text_encoders, strict=True):
                encoder.requires_grad_(True)
                groups.append({"params": list(encoder.parameters()), "lr": cfg.text_encoder_lr or train_lr})
                self.trained.append(name)
        return groups

    def trained_modules(self) -> list[str]:
        return list(self.trained)

    def after_step(self, comps) -> None:
        pass

    def trainable_state(self, comps) -> dict:
        modules = comps.named_modules()
        return {f"{name}.{k}": p for name in self.trained
                for k, p in modules[name].named_parameters() if p.requires_grad}

    def export(self, comps, out_dir, ctx) -> list:
        # the components hold the trained weights (EMA already copied in by the loop when enabled)
        from finetune.export.full import export_full

        return export_full(_with_full_precision_frozen(comps, self.trained, ctx), out_dir, ctx)


def _with_full_precision_frozen(comps, trained: list[str], ctx):
    """Under mixed precision the frozen VAE / text encoders were cast down for training; the exported model
    must carry the base's own weights, so frozen parts are reloaded from the base in fp32."""
    import dataclasses

    import torch

    frozen = {n: m for n, m in comps.named_modules().items() if n not in trained}
    if all(p.dtype == torch.float32 for m in frozen.values() for p in m.parameters()):
        return comps
    from finetune.models.components import load_components
    from finetune.sections import ModelSection

    # the same base (its value, as it loaded), with the base's own weights, never quantized ones;
    # ctx.recipe hides local paths (a local model.vae), ctx.model keeps them
    section = {**(ctx.model or ctx.recipe["model"]), "quantize": "none", "quantize_text_encoders": "none"}
    fresh = load_components(comps.base, ModelSection(**section).load_options())
    names = comps.text_encoder_names
    encoders = [enc if name in trained else fresh.text_encoders[i]
                for i, (name, enc) in enumerate(zip(names, comps.text_encoders, strict=True))]
    return dataclasses.replace(comps, vae=fresh.vae, text_encoders=encoders)
