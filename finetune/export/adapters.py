"""LoRA-family adapter files in any of our layouts, read into one form (finetune.export.layers), and applied.

Readers accept the diffusers/peft file (`pytorch_lora_weights`), our peft file for kinds diffusers cannot load
(`peft_adapter`) and the kohya/LyCORIS file; a layer's delta comes from its kind (finetune.kinds), the formula
the UIs use, so fusing, merging and resizing never need peft at run time. Module names are the family's
(`Family.kohya_names`): one spelling per module whatever wrote the file, located in a model through the same
table.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.errors import ModelError
from finetune.export.io import read_tensors
from finetune.export.kohya import guess_family, is_kohya, kohya_layers
from finetune.export.layers import (  # noqa: F401 - re-exported: the adapter API lives here
    ADAPTER_META,
    DIFFUSERS_FILE,
    PEFT_FILE,
    PEFT_META,
    REPLACED_MODULES,
    Adapter,
    Layer,
)
from finetune.export.layouts import bound_names
from finetune.kinds import kind_of_peft, peft_spellings

if TYPE_CHECKING:
    import torch

log = logging.getLogger("finetune.export")


# --------------------------------------------------------------------------------------------- reading
def read_adapter(path: str | Path, allow_pickle: bool = False, family=None, modules=None,
                 reader=read_tensors) -> Adapter:
    """Read any LoRA-family file we know; a one-line ModelError for anything else. `family` and `modules`
    (the base it will be applied to) fit the key names to that base; without them the file's header and
    the family's reference layout are used. `reader`: io.read_header_tensors describes a file without torch."""
    path = Path(path)
    if path.is_dir():
        found = [path / f for f in (DIFFUSERS_FILE, PEFT_FILE) if (path / f).is_file()]
        if not found:
            raise ModelError(f"{path}: folder holds no {DIFFUSERS_FILE} or {PEFT_FILE}")
        path = found[0]
    tensors, meta = reader(path, allow_pickle)
    if not tensors:
        raise ModelError(f"{path}: holds no tensors")
    layout = None if family is not None and not family.lora_layouts else _family_layout(tensors, family)
    if layout is not None:  # a family's own layout (FLUX's BFL names): its module reads it
        family, fmt, module = layout
        names = bound_names(family.kohya_names, modules, meta)
        layers = module.read(tensors, names, path)
        return Adapter(layers=layers, format=fmt, metadata=meta, path=path, family=family.name)
    family = family or guess_family(tensors, meta)
    names = bound_names(family.kohya_names, modules, meta)
    if is_kohya(tensors):
        layers, fmt = kohya_layers(tensors, path, names), "kohya"
        if not any(k.endswith(".alpha") for k in tensors):
            log.warning(f"note: {path.name} has no alpha tensors: alpha taken as each layer's rank (scale 1), "
                        "as ComfyUI and AUTOMATIC1111 do")
    else:
        replaced = {k: tensors.pop(k) for k in list(tensors) if replaces_weight(k)}
        configs = peft_configs(meta)
        if not configs:
            log.warning(f"note: {path.name} has no adapter config in its header: alpha taken as each layer's rank "
                        "(scale 1), as diffusers does")
        layers = peft_layers(tensors, configs, path)
        layers = {_canonical(n, names): layer for n, layer in layers.items()}
        fmt = "peft" if PEFT_META in meta else "diffusers"
        return Adapter(layers=layers, format=fmt, metadata=meta, path=path, family=family.name, replaced=replaced)
    return Adapter(layers=layers, format=fmt, metadata=meta, path=path, family=family.name)


def replaces_weight(key: str) -> bool:
    """A diffusers-file key that is a whole weight replacing the base's (REPLACED_MODULES), not an adapter's."""
    module, _, leaf = key.rpartition(".")
    return leaf == "weight" and module.rpartition(".")[2] in REPLACED_MODULES and "." in module


def _family_layout(tensors, family=None):
    """(family, format, module) of the family layout these tensors are written in, or None."""
    import importlib

    from finetune.models.families import FAMILIES

    for f in [family] if family is not None else FAMILIES.values():
        for fmt, module_name in f.lora_layouts.items():
            module = importlib.import_module(module_name)
            if module.detect(tensors):
                return f, fmt, module
    return None


def _canonical(name: str, names) -> str:
    component, path = name.split(".", 1)
    return f"{component}.{names[component].canonical(path)}" if component in names else name


def peft_configs(meta: dict[str, str]) -> dict[str, dict]:
    """Per-component peft configs from our peft header or diffusers' lora_adapter_metadata."""
    try:
        if PEFT_META in meta:
            return json.loads(meta[PEFT_META])
        configs: dict[str, dict] = {}
        for key, value in json.loads(meta.get(ADAPTER_META, "{}")).items():
            component, name = key.split(".", 1)
            configs.setdefault(component, {})[name] = value
        return configs
    except (ValueError, AttributeError):
        raise ModelError(f"the adapter config in the header ({PEFT_META} / {ADAPTER_META}) is not readable JSON") from None


def _pattern(pattern: dict | None, module: str, default):
    """peft's rule: rank_pattern / alpha_pattern keys are patterns matched against the end of a module path."""
    if not pattern:
        return default
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(list(pattern), module)
    return pattern.get(key, default)


def peft_layers(tensors: dict[str, torch.Tensor], configs: dict[str, dict], where) -> dict[str, Layer]:
    """Module-prefixed peft tensors ('unet.<path>.lora_A.weight') and their peft configs -> layers."""
    spellings = peft_spellings()
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        suffix = next((s for s in spellings if key.endswith("." + s)), None)
        module = key[: -len(suffix) - 1] if suffix else ""
        if suffix is None or "." not in module:
            raise ModelError(f"{where}: unknown key layout ('{key}'); expected a diffusers, peft or kohya LoRA file")
        grouped.setdefault(module, {})[spellings[suffix]] = value
    layers = {}
    for name, t in grouped.items():
        component, module = name.split(".", 1)
        kind = kind_of_peft(t, f"{where}: layer '{name}'")
        kind.check(t, f"{where}: layer '{name}'")
        cfg = configs.get(component, {})
        shown = kind.rank(t)
        rank = int(_pattern(cfg.get("rank_pattern"), module, cfg.get("r")) or shown or 1)
        alpha = cfg.get(kind.alpha_key) if kind.alpha_key else None
        alpha = _pattern(cfg.get("alpha_pattern"), module, alpha)
        alpha = float(alpha if alpha is not None else rank)
        layers[name] = Layer(kind.name, t, alpha, shown or rank, alpha / rank)
    return layers


# ----------------------------------------------------------------------------------------------- math
def factors_delta(layer: Layer, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """scale * (the factors' product), shaped like the base weight (fp32); a DoRA magnitude is not applied."""
    import torch

    d = layer.spec.factors({k: v.float() for k, v in layer.tensors.items()})
    if d.numel() != torch.Size(shape).numel():
        raise ValueError(f"delta of {tuple(d.shape)} does not fit a weight of {tuple(shape)}")
    return (d * layer.scale).reshape(shape)


def delta(layer: Layer, weight: torch.Tensor) -> torch.Tensor:
    """The change the layer makes to `weight` (what its kind says, DoRA included)."""
    return layer.spec.delta(layer, weight.float())


def low_rank_factors(layer: Layer, refusal: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B * scale, A) of a layer whose delta is a plain product B @ A (its kind says so); otherwise a ModelError
    with `refusal`, its '{what}' filled with the layer's kind (or DoRA)."""
    factors = layer.spec.low_rank(layer)
    if factors is None:
        raise ModelError(refusal.format(what="DoRA" if layer.dora else layer.kind))
    return factors


def locate_layer(name: str, modules: dict, names, where: str) -> torch.nn.Module:
    """The base layer an adapter layer 'component.path' applies to (kohya names through `names`; under a layer a
    method's peft adapter already wraps, the wrapped one), or a ModelError naming `where` and the layer."""
    component, path = name.split(".", 1)
    if component not in modules:
        raise ModelError(f"{where}: has layers for '{component}', which this base does not have")
    try:
        module = names[component].locate(modules[component], path) if component in names else \
            modules[component].get_submodule(path)
    except AttributeError:
        raise ModelError(f"{where}: layer '{name}' is not in the base (an adapter for another family or base?)") \
            from None
    return getattr(module, "base_layer", module)


def fuse(adapter: Adapter, modules: dict[str, torch.nn.Module], strength: float = 1.0, names=None) -> int:
    """Add the adapter's deltas (times `strength`) into the weights of `modules`; returns layers fused.

    `names` is the base's family table (`Family.kohya_names`). Whole weights the file carries (`replaced`: a
    FLUX Control LoRA's trained norm scales) replace the base's, unscaled, as diffusers' loader does. All layers are
    checked before any weight changes (and a file missing layers its config names is refused), so a bad file
    leaves the model untouched.
    """
    import torch

    if names is None:
        from finetune.models.families import FAMILIES

        names = FAMILIES[adapter.family or "sd1"].kohya_names
    names = bound_names(names, modules)
    check_complete(adapter, modules, names)
    targets = []
    for name, layer in adapter.layers.items():
        weight = locate_layer(name, modules, names, str(adapter.path)).weight
        try:
            d = delta(layer, weight.data)
        except (ValueError, RuntimeError):
            raise ModelError(f"{adapter.path}: layer '{name}' does not fit the base weight "
                             f"{tuple(weight.shape)} (a LoRA for another family or base?)") from None
        targets.append((weight, d))
    replaced = [(_replaced_weight(adapter, key, value, modules), value) for key, value in adapter.replaced.items()]
    with torch.no_grad():
        for weight, d in targets:
            weight.add_((strength * d).to(weight.dtype))
        for weight, value in replaced:  # whole weights, as diffusers' loader writes them: not scaled by strength
            weight.copy_(value.to(weight.dtype))
    return len(targets) + len(replaced)


def _replaced_weight(adapter: Adapter, key: str, value, modules):
    """The base parameter a whole weight of the file replaces ('<component>.<parameter path>'), checked."""
    component, _, name = key.partition(".")
    try:
        weight = modules[component].get_parameter(name)
    except (KeyError, AttributeError):
        raise ModelError(f"{adapter.path}: '{key}' names no weight of the base (a LoRA for another base?)") from None
    if tuple(weight.shape) != tuple(value.shape):
        raise ModelError(f"{adapter.path}: '{key}' of {tuple(value.shape)} does not fit the base weight "
                         f"{tuple(weight.shape)} (a LoRA for another family or base?)")
    return weight


def check_complete(adapter: Adapter, modules: dict[str, torch.nn.Module], names) -> None:
    """Refuse a file that lacks layers its own header's peft config targets in this base (a truncated file
    would otherwise apply partially and silently), naming the missing tensors."""
    import torch
    from peft import PeftConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    missing = []
    for component, cfg in peft_configs(adapter.metadata).items():
        if component not in modules or not cfg.get("target_modules"):
            continue
        try:
            config = PeftConfig.from_peft_type(**cfg)
        except (TypeError, ValueError, KeyError):
            continue  # a config peft cannot rebuild says nothing we could check
        canonical = names[component].canonical if component in names else (lambda p: p)
        for path, module in modules[component].named_modules():
            # (a module already carrying a peft adapter keeps its layer as `base_layer`)
            if not path or not isinstance(getattr(module, "base_layer", module), torch.nn.Linear | torch.nn.Conv2d):
                continue
            hits = check_target_module_exists(config, path) or check_target_module_exists(config, canonical(path))
            if hits and f"{component}.{canonical(path)}" not in adapter.layers:
                missing.append(f"{component}.{canonical(path)}")
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ModelError(f"{adapter.path}: {len(missing)} layer(s) its config targets are missing ({shown}); "
                         "a truncated or damaged file")
