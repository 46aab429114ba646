"""`lora`: low-rank adapters through peft (LoRA, DoRA, LoHa, LoKr) on the denoiser, optionally the text encoders.

Config is pure pydantic; torch and peft are imported only when the method is built.
"""

from __future__ import annotations

import warnings
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from finetune.errors import did_you_mean
from finetune.kinds import get_kind, registered_kinds
from finetune.methods.base import MethodConfig, register_method
from finetune.sections import StrictModel

# Denoiser target presets belong to each family (finetune/models/families: `lora_presets`).
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
    export_formats: ClassVar[frozenset[str]] = frozenset({"diffusers", "kohya", "bfl", "nextdit"})

    adapter: str = Field(
        "lora", description="Adapter kind (finetune.kinds): lora (with optional DoRA), loha or lokr (peft)."
    )
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA); adapter: lora only.")
    rank: int = Field(16, ge=1, le=1024, description="Adapter rank (dimension).")
    alpha: float | None = Field(None, gt=0.0, description="Scaling alpha (scale = alpha/rank); default the rank.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    targets: str | list[str] = Field(
        "attention",
        description="Denoiser modules: a preset of the family (U-Nets: attention, attention_ff, locon; SD3/FLUX "
        "transformers: attention, attention_mlp, ...) or a list of module-name suffixes.",
    )
    blocks: list[str] | None = Field(
        None, description="Adapt only modules inside these blocks, by module path: e.g. [transformer_blocks.0, "
        "single_transformer_blocks.7]; null adapts every block the targets match.",
    )
    text_encoder: TextEncoderLoRA = Field(default_factory=TextEncoderLoRA, description="Text-encoder LoRA.")

    @field_validator("adapter")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        kinds = registered_kinds()
        if v not in kinds:
            raise ValueError(f"unknown adapter kind '{v}'{did_you_mean(v, kinds)}; known: {sorted(kinds)}")
        return v

    @model_validator(mode="after")
    def _combos(self):
        if self.use_dora and not get_kind(self.adapter).supports_dora:
            raise ValueError(f"use_dora works with adapter: lora only, not adapter: {self.adapter}")
        if isinstance(self.targets, list) and not self.targets:
            raise ValueError("targets is an empty list; name modules or use a preset")
        if isinstance(self.targets, str):
            from finetune.models.families import FAMILIES

            presets = sorted({p for f in FAMILIES.values() for p in f.lora_presets})
            if self.targets not in presets:
                from finetune.errors import did_you_mean

                raise ValueError(f"targets '{self.targets}' is not a preset{did_you_mean(self.targets, presets)}; "
                                 f"presets: {', '.join(presets)}, or a list of module-name suffixes")
        return self

    def switchable_adapters(self) -> bool:
        return True

    def trains_text_encoder(self) -> bool:
        return self.text_encoder.enabled

    def trains_in_place(self) -> frozenset[str]:
        return frozenset()  # adapters only: every base weight stays frozen (and may be quantized)

    def denoiser_targets(self, family=None) -> list[str] | str:
        """What to adapt in the denoiser, as peft takes it: module-name suffixes (the family's preset or the
        recipe's list) or one regex, narrowed to `blocks` when given."""
        from finetune.models.families.sd import SD1

        targets = list(self.targets) if isinstance(self.targets, list) else (family or SD1).lora_targets(self.targets)
        return within_blocks(targets, self.blocks) if self.blocks else targets

    def check_recipe(self, recipe) -> None:
        check_formats(self, recipe, None)  # the default, where the family is not known yet (checked again then)

    def check_family(self, recipe, family) -> None:
        check_formats(self, recipe, family)
        if isinstance(self.targets, str) and self.targets not in family.lora_presets:
            raise ValueError(f"method.targets '{self.targets}' is not a preset of the {family.name} family; its "
                             f"presets are {', '.join(family.lora_presets)}, or list module-name suffixes")

    def build(self):
        return LoRAMethod(self)


def within_blocks(targets: list[str] | str, blocks: list[str]) -> str:
    """One regex (peft full-matches it against module names) for `targets` inside the named blocks."""
    import re

    inside = "(?:" + "|".join(re.escape(b.strip(".")) for b in blocks) + r")\."
    if isinstance(targets, str):
        return f"(?={inside})(?:{targets})"
    return inside + r"(?:.*\.)?(?:" + "|".join(re.escape(t) for t in targets) + ")"


def check_formats(cfg: LoRAConfig, recipe, family, key: str = "method.use_dora") -> None:
    """Which LoRA files a run writes. By default: every format that holds this adapter exactly for this
    family; asking for one that cannot is refused before anything loads:
    - a family's own layouts (FLUX's 'bfl') exist only for that family (left out of the default when the family
      is unknown until the base loads; one asked for then is checked once it has loaded);
    - DoRA has no exact kohya form (finetune/kinds/lora.py), and 'bfl' fuses plain LoRA only."""
    own = set(family.lora_layouts) if family is not None else set()
    layouts = {f for f in recipe.method.export_formats if f not in ("diffusers", "kohya", "a1111", "single_file")}
    inexact = {"kohya", *layouts} if cfg.use_dora else set(layouts) if cfg.adapter != "lora" else set()
    formats = recipe.export.formats
    if formats is None:
        recipe.export.formats = sorted((f for f in recipe.method.export_formats
                                        if f not in (layouts - own) | inexact), key=lambda f: (f != "diffusers", f))
        return
    for f in formats:
        if f in layouts - own and family is not None:
            raise ValueError(f"export.formats: '{f}' is not a LoRA layout of the {family.name} family; "
                             "use diffusers or kohya")
        if f == "kohya" and cfg.use_dora:
            raise ValueError(
                f"export.formats: 'kohya' cannot carry DoRA ({key}: true) exactly: AUTOMATIC1111 normalises the "
                "magnitude over input columns and ComfyUI by the base weight's norm; drop 'kohya' and bake the "
                "diffusers file into a checkpoint for the UIs with tools/merge.py fuse --single-file")
        if f in inexact:
            raise ValueError(f"export.formats: '{f}' fuses q/k/v and holds plain LoRA only, not "
                             f"{'DoRA' if cfg.use_dora else cfg.adapter}; drop it (kohya and diffusers keep it)")


def peft_adapter_config(cfg: LoRAConfig, rank: int, alpha: float, targets: list[str] | str):
    """The peft config of one adapter (denoiser or text encoder), built by the adapter kind."""
    return get_kind(cfg.adapter).peft_config(rank, alpha, targets, dropout=cfg.dropout, use_dora=cfg.use_dora)


class LoRAMethod:
    """Injects peft adapters; trains only them (U-Net, optionally the text encoders)."""

    def __init__(self, config: LoRAConfig):
        self.config = config
        self.adapted: list[str] = []

    def setup(self, comps, train_lr: float) -> list[dict]:
        cfg = self.config
        alpha = cfg.alpha or cfg.rank
        groups = []
        for name in comps.trained_experts:  # one denoiser, or each trained expert (Wan 2.2) its own adapter
            denoiser = comps.experts[name]
            config = peft_adapter_config(cfg, cfg.rank, alpha, self.denoiser_targets(comps))
            # modules whose output reaches nothing (Qwen-Image's last text stream) would never train, and DDP
            # refuses parameters without gradients: the family names them, peft leaves them out
            config.exclude_modules = comps.family.unused_modules(denoiser) or None
            with warnings.catch_warnings():  # peft warns when the targets never reached those modules anyway
                warnings.filterwarnings("ignore", message="You have passed exclude_modules")
                _add_adapter(denoiser, config, "method.targets", cfg.targets)
            groups.append({"params": _trainable(denoiser), "lr": train_lr})
        self.adapted = list(comps.trained_experts)
        te = cfg.text_encoder
        if te.enabled:
            rank = te.rank or cfg.rank
            allowed = comps.family.lora_text_encoders
            for name, encoder in zip(comps.text_encoder_names, comps.text_encoders, strict=True):
                if allowed is not None and name not in allowed:
                    continue
                _add_adapter(encoder, peft_adapter_config(cfg, rank, te.alpha or rank, te.targets),
                             "method.text_encoder.targets", te.targets)
                groups.append({"params": _trainable(encoder), "lr": te.lr or train_lr})
                self.adapted.append(name)
        return groups

    def denoiser_targets(self, comps) -> list[str] | str:
        """What the denoiser's adapter reaches (the recipe's targets; a subclass may add modules)."""
        return self.config.denoiser_targets(comps.family)

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
