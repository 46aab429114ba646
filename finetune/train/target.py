"""`validation.base`: the grids come from another base than the one training, the trained adapters applied to it.

Route 1 for distilled bases: train where the model learns (the undistilled Z-Image, FLUX.2 [klein] Base, the toy's
toy-flux) and look at the LoRA where it will be used (Z-Image-Turbo, [klein] 4B, toy-flux-turbo), at that base's
own steps and guidance. Only the target's denoiser and scheduler load: its text encoders and VAE must be the
training base's (checked on their configs), so the run's encoders, caches and VAE serve both. Every layer the
method adapts must exist in the target with the same weight shape (checked once the adapters are in place, one
line naming the first that differs). The target waits on the CPU and is lent to the device for each grid, unless
it is quantized (bitsandbytes quantizes on the move to the device), then it stays there.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from finetune.errors import ModelError
from finetune.models.base import Base

KEY = "validation.base"


@dataclass
class Target:
    base: Base  # complete: its family known
    denoiser: Any
    sampler: Any  # the target's own scheduler (its shift: Z-Image-Turbo's static 3, [schnell]'s 1)
    pipeline_config: dict[str, Any]  # its model_index.json settings the family keeps (FLUX.2 [klein]: is_distilled)
    resident: bool = False  # stays on the device (quantized)

    @classmethod
    def load(cls, base: Base, comps, options, precision) -> Target:
        """The target's denoiser, frozen in the compute dtype (quantized as the training denoiser is)."""
        from finetune.models.components import load_denoiser

        if base.form == "file":
            raise ModelError(f"{KEY} '{base.name}': give a diffusers folder or hub id (single files: model.base only)")
        check_shared_parts(comps.base, base, comps.family)
        denoiser, sampler, config = load_denoiser(base, options, precision, comps.vae)
        return cls(base, denoiser, sampler, config, resident=options.quantize in ("nf4", "int8"))

    def check_layers(self, trained) -> int:
        """Every module the method adapted in `trained` (the training denoiser) is in the target with the same
        weight shape; returns how many."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [(p, m) for p, m in trained.named_modules() if isinstance(m, BaseTunerLayer)]
        for path, module in layers:
            mine = _shape(module.get_base_layer())
            try:
                theirs = _shape(self.denoiser.get_submodule(path))
            except AttributeError:
                raise ModelError(f"{KEY} '{self.base.name}' has no layer '{path}', which the method adapts in "
                                 "model.base; the two are not the same architecture") from None
            if tuple(theirs) != tuple(mine):
                raise ModelError(f"{KEY} '{self.base.name}': layer '{path}' is {tuple(theirs)} there and "
                                 f"{tuple(mine)} in model.base; the two are not the same architecture")
        return len(layers)

    def sync(self, trained) -> None:
        """The trained adapters' current weights into the target (its own copy of their peft layers)."""
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        config = getattr(trained, "peft_config", {}).get("default")
        if config is None:  # nothing trained in the denoiser (Textual Inversion): the shared encoders carry it
            return
        if "default" not in getattr(self.denoiser, "peft_config", {}):
            self.denoiser.add_adapter(copy.deepcopy(config))
            self.denoiser.requires_grad_(False)
        state = get_peft_model_state_dict(trained)
        result = set_peft_model_state_dict(self.denoiser, state)
        unplaced = getattr(result, "unexpected_keys", [])
        if unplaced:
            raise ModelError(f"{KEY} '{self.base.name}': the trained adapter's '{unplaced[0]}' has no place there")

    def view(self, comps):
        """`comps` with the target's denoiser, sampler and pipeline settings: what validation renders with."""
        extras = {**comps.extras, "sampler": self.sampler, "pipeline_config": self.pipeline_config}
        return replace(comps, denoiser=self.denoiser, scheduler=self.sampler, base=self.base, extras=extras)

    @contextmanager
    def on_device(self, device):
        """Lend the target to `device` for one grid (a quantized one lives there)."""
        if self.resident:
            self.denoiser.to(device)
            yield
            return
        self.denoiser.to(device)
        try:
            yield
        finally:
            self.denoiser.to("cpu")


def _shape(layer) -> tuple[int, ...]:
    """A layer's weight shape as its constructor set it (a bitsandbytes 4-bit weight is stored packed)."""
    if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
        return (layer.out_features, layer.in_features)
    return tuple(layer.weight.shape)


def check_shared_parts(train: Base, target: Base, family) -> None:
    """The target's text encoders and VAE must be the training base's (same configs), as the run shares them."""
    from finetune.models.sampling import read_configs

    mine, theirs = read_configs(train.folder, train.index), read_configs(target.folder, target.index)
    for name in (*family.text_encoder_names, "vae"):
        if name in mine and name in theirs and _arch(mine[name]) != _arch(theirs[name]):
            raise ModelError(f"{KEY} '{target.name}': its {name} differs from model.base's (config.json); the run "
                             "renders with model.base's encoders and VAE, so both bases must share them")


def _arch(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in ("torch_dtype", "dtype")}


def sampling_base(t) -> Base:
    """The base whose sampling defaults the grids use: validation.base, else model.base."""
    target = getattr(t, "target", None)
    return target.base if target is not None else t.recipe.base


def grid_settings(t, v) -> Any:
    """`validation` with null steps / guidance filled from the sampling base's own (30 steps where it has none)."""
    s = sampling_base(t).sampling
    steps = v.steps or (s.steps if s is not None and s.steps else 30)
    guidance = v.guidance_scale if v.guidance_scale is not None else (s.guidance if s is not None else None)
    return v.model_copy(update={"steps": steps, "guidance_scale": guidance})



def load_target(recipe, comps, precision) -> Target | None:
    """`validation.base` loaded beside the training base, checked against the adapters the method put in place."""
    if recipe.validation_base is None:
        return None
    from finetune.routes import complete_other

    base = complete_other(recipe, recipe.validation_base, KEY)
    target = Target.load(base, comps, recipe.model.load_options(), precision)
    target.check_layers(comps.denoiser)
    return target


def attach_training_adapter(recipe, comps):
    """`model.training_adapter` hooked onto the loaded base (finetune/models/training_adapter.py), or None."""
    value = recipe.model.training_adapter
    if value is None:
        return None
    from finetune.models.training_adapter import TrainingAdapter, adapter_file

    return TrainingAdapter.attach(adapter_file(value), comps.named_modules(), comps.family,
                                  allow_pickle=recipe.model.allow_pickle)
