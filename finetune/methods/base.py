"""What a method is: a config class (pure pydantic, registered by name) and an object that sets up
what trains. The trainer talks to methods only through `Method`; adding one needs no trainer edits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from finetune.sections import StrictModel

if TYPE_CHECKING:  # heavy imports only for type checkers
    from pathlib import Path

    import torch

    from finetune.models.components import Components


class MethodConfig(StrictModel):
    """Base of every method's recipe section. `name` selects the method."""

    name: str
    #: export formats this method can write (checked against `export.formats` at recipe time)
    export_formats: ClassVar[frozenset[str]] = frozenset({"diffusers"})

    def trains_text_encoder(self) -> bool:
        """True when text-encoder weights or embeddings change (text caching is then impossible)."""
        return False

    def trains_in_place(self) -> frozenset[str]:
        """Parts whose own weights train ('denoiser', 'text_encoders'): they load in fp32 and cannot be
        quantized. Adapters are new weights and never count; by default a method that trains the text
        encoder (token embeddings) trains it in place."""
        return frozenset({"text_encoders"}) if self.trains_text_encoder() else frozenset()

    def adds_tokens(self) -> bool:
        """True when the method adds new token embeddings (families must support Textual Inversion)."""
        return False

    def switchable_adapters(self) -> bool:
        """True when the method changes the denoiser only through peft adapters, which can be switched off to get
        the base's own prediction (base-prediction preservation, data.preservation; validation drift)."""
        return False

    def check_recipe(self, recipe) -> None:
        """Checks that need the rest of the recipe (e.g. the base's vocabulary); raise ValueError naming the key."""

    def check_family(self, recipe, family) -> None:
        """Checks that need the base's family (LoRA presets, export forms). They run as soon as the family is
        known: while the recipe validates, or once a base that was not on this machine has loaded."""

    def conditioning_family(self, family):
        """The family that takes the conditioning images (data.conditioning) when this method trains a base of
        `family`: the family itself, or the variant a control method turns it into."""
        return family

    def build(self) -> Method:
        raise NotImplementedError


class Method(Protocol):
    """The small surface the trainer uses."""

    config: MethodConfig

    def setup(self, comps: Components, train_lr: float) -> list[dict[str, Any]]:
        """Unfreeze or inject what trains; return optimizer parameter groups ({'params', 'lr'}). A group may
        add 'active_steps': (first, stop or None), the optimizer steps it trains in (a phase): outside them it
        gets no gradient and learning rate 0, and its schedule runs over its window only."""
        ...

    def trained_modules(self) -> list[str]:
        """Names of component modules that hold trained parameters (the denoiser's, 'text_encoder', ...)."""
        ...

    def after_step(self, comps: Components) -> None:
        """Called after every optimizer step."""
        ...

    # Optional: `prepare_captions(self, captions: list[str], keys: list[int] | None) -> list[str]` rewrites
    # captions before they are tokenized (e.g. expanding a multi-vector placeholder); `keys` are the examples'
    # seeds (finetune.train.loss.example_keys), for anything random. The trainer calls it when present.

    def trainable_state(self, comps: Components) -> dict[str, torch.Tensor]:
        """The trained tensors, by stable names: what checkpoints compare and exports write."""
        ...

    def export(self, comps: Components, out_dir: Path, ctx: Any) -> list[Path]:
        """Write the final artifacts through finetune.export; return the written paths."""
        ...


_REGISTRY: dict[str, type[MethodConfig]] = {}


def register_method(cls: type[MethodConfig]) -> type[MethodConfig]:
    """Class decorator: register a method config under its `name` literal. Duplicates are refused."""
    name = cls.model_fields["name"].default
    if not isinstance(name, str):
        raise TypeError(f"{cls.__name__}.name needs a default literal")
    if name in _REGISTRY:
        raise ValueError(f"method {name!r} is registered twice ({_REGISTRY[name].__name__}, {cls.__name__})")
    _REGISTRY[name] = cls
    return cls


def registered_methods() -> dict[str, type[MethodConfig]]:
    return dict(_REGISTRY)
