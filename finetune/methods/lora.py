"""`lora`: low-rank adapters through peft (LoRA, DoRA, LoHa, LoKr) on the U-Net, optionally the text encoder.

Config is pure pydantic; torch and peft are imported only when the method is built.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from finetune.methods.base import MethodConfig, register_method
from finetune.sections import StrictModel

# Target-module presets for the U-Net. Names are module-name suffixes as peft matches them.
UNET_TARGETS: dict[str, list[str]] = {
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
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


class TextEncoderLoRA(StrictModel):
    enabled: bool = Field(False, description="Also train a LoRA on the text encoder(s).")
    rank: int | None = Field(None, ge=1, le=1024, description="Rank; default the U-Net rank.")
    alpha: float | None = Field(None, gt=0.0, description="Alpha; default the rank.")
    lr: float | None = Field(None, gt=0.0, le=1.0, description="Learning rate; default train.lr.")
    targets: list[str] = Field(
        default_factory=lambda: list(TEXT_ENCODER_TARGETS), min_length=1, description="Text-encoder modules."
    )


@register_method
class LoRAConfig(MethodConfig):
    name: Literal["lora"] = "lora"
    export_formats: ClassVar[frozenset[str]] = frozenset({"diffusers", "kohya"})

    adapter: Literal["lora", "loha", "lokr"] = Field(
        "lora", description="Adapter type: LoRA (with optional DoRA), LoHa or LoKr (peft)."
    )
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA); adapter: lora only.")
    rank: int = Field(16, ge=1, le=1024, description="Adapter rank (dimension).")
    alpha: float | None = Field(None, gt=0.0, description="Scaling alpha (scale = alpha/rank); default the rank.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    targets: Literal["attention", "attention_ff", "locon"] | list[str] = Field(
        "attention", description="U-Net modules: a preset (attention, attention_ff, locon) or module-name suffixes."
    )
    text_encoder: TextEncoderLoRA = Field(default_factory=TextEncoderLoRA, description="Text-encoder LoRA.")

    @model_validator(mode="after")
    def _combos(self):
        if self.use_dora and self.adapter != "lora":
            raise ValueError(f"use_dora works with adapter: lora only, not adapter: {self.adapter}")
        if isinstance(self.targets, list) and not self.targets:
            raise ValueError("targets is an empty list; name modules or use a preset")
        return self

    def trains_text_encoder(self) -> bool:
        return self.text_encoder.enabled

    def unet_targets(self) -> list[str]:
        return list(UNET_TARGETS[self.targets]) if isinstance(self.targets, str) else list(self.targets)

    def build(self):
        return LoRAMethod(self)


def peft_adapter_config(cfg: LoRAConfig, rank: int, alpha: float, targets: list[str]):
    """The peft config of one adapter (U-Net or text encoder) for the chosen adapter type."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if cfg.adapter == "loha":
        return LoHaConfig(r=rank, alpha=alpha, target_modules=targets, module_dropout=cfg.dropout)
    if cfg.adapter == "lokr":
        return LoKrConfig(r=rank, alpha=alpha, target_modules=targets, module_dropout=cfg.dropout)
    return LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=cfg.dropout,
        use_dora=cfg.use_dora, init_lora_weights="gaussian",
    )


class LoRAMethod:
    """Injects peft adapters; trains only them (U-Net, optionally the text encoders)."""

    def __init__(self, config: LoRAConfig):
        self.config = config
        self.adapted: list[str] = []

    def setup(self, comps, train_lr: float) -> list[dict]:
        cfg = self.config
        alpha = cfg.alpha or cfg.rank
        _add_adapter(comps.unet, peft_adapter_config(cfg, cfg.rank, alpha, cfg.unet_targets()),
                     "method.targets", cfg.targets)
        groups = [{"params": _trainable(comps.unet), "lr": train_lr}]
        self.adapted = ["unet"]
        te = cfg.text_encoder
        if te.enabled:
            rank = te.rank or cfg.rank
            for name, encoder in zip(comps.family.text_encoder_names, comps.text_encoders, strict=True):
                _add_adapter(encoder, peft_adapter_config(cfg, rank, te.alpha or rank, te.targets),
                             "method.text_encoder.targets", te.targets)
                groups.append({"params": _trainable(encoder), "lr": te.lr or train_lr})
                self.adapted.append(name)
        return groups

    def trained_modules(self) -> list[str]:
        return list(self.adapted)

    def after_step(self, comps) -> None:
        pass

    def trainable_state(self, comps) -> dict:
        from peft.utils import get_peft_model_state_dict

        modules = comps.named_modules()
        state = {}
        for name in self.adapted:
            for k, v in get_peft_model_state_dict(modules[name], save_embedding_layers=False).items():
                state[f"{name}.{k}"] = v
        return state

    def export(self, comps, out_dir, ctx) -> list:
        from finetune.export.lora import export_lora

        return export_lora(comps, self, out_dir, ctx)


def _trainable(module) -> list:
    return [p for p in module.parameters() if p.requires_grad]


def _add_adapter(module, config, key: str, targets) -> None:
    """Inject one adapter; targets that match no module are the user's mistake, named by their key."""
    from finetune.errors import ModelError

    try:
        module.add_adapter(config)
    except ValueError as e:
        if "not found" not in str(e):
            raise
        raise ModelError(
            f"{key} {targets!r} matched no module of the base; use a preset (attention, attention_ff, locon) "
            "or module-name suffixes such as to_q (text encoders: q_proj, k_proj, v_proj, out_proj)"
        ) from None
    if not any(p.requires_grad for p in module.parameters()):
        raise ModelError(f"{key} {targets!r} matched no trainable module of the base; check the names")
