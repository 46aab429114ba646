"""The kohya / LyCORIS key layout that ComfyUI and AUTOMATIC1111 load natively.

    <prefix>_<module name with '_'>.<tensor>    lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight
                                                lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha

Prefixes and module names come from the family (`Family.kohya_names`, finetune.export.layouts: which names the
UI loaders map, per family); tensor names and the scale rule (alpha / rank, 1 when the tensors show no rank)
come from the adapter kind (finetune.kinds). Nothing here knows a family or a kind by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from finetune.errors import ModelError
from finetune.export.layers import Layer
from finetune.export.layouts import LAYOUT_KEY, ModuleNames
from finetune.kinds import kind_of_kohya, kohya_spellings


def known_prefixes() -> tuple[str, ...]:
    from finetune.models.families import FAMILIES

    return tuple(sorted({p for f in FAMILIES.values() for n in f.kohya_names.values() for p in n.prefixes}))


def is_kohya(tensors: dict[str, Any]) -> bool:
    starts = tuple(f"{p}_" for p in known_prefixes())
    return bool(tensors) and all("." in k and k.split(".")[0].startswith(starts) for k in tensors)


def guess_family(tensors: dict[str, Any], meta: dict[str, str]):
    """The family a LoRA file is for: our header, kohya's metadata, then a key prefix or component only one
    family has (SDXL's lora_te2 / text_encoder_2); SD 1.x otherwise (SD 1.x and 2.x share every key name)."""
    from finetune.models.families import FAMILIES

    if meta.get("finetune.family") in FAMILIES:
        return FAMILIES[meta["finetune.family"]]
    version = meta.get("ss_base_model_version")
    for family in FAMILIES.values():
        if version == family.base_version and (family.ss_v2 == (meta.get("ss_v2") == "True") or "ss_v2" not in meta):
            return family
    heads = {k.split(".")[0] for k in tensors}
    for family in FAMILIES.values():
        others = [f for f in FAMILIES.values() if f is not family]
        prefixes = {p for n in family.kohya_names.values() for p in n.prefixes}
        prefixes -= {p for f in others for n in f.kohya_names.values() for p in n.prefixes}
        components = set(family.kohya_names) - {c for f in others for c in f.kohya_names}
        if heads & components or any(h.startswith(tuple(f"{p}_" for p in prefixes)) for h in heads):
            return family
    return FAMILIES["sd1"]


# ------------------------------------------------------------------------------------------- writing
def layers_to_kohya(layers: dict[str, Layer], names: dict[str, ModuleNames], where: str = "adapter") -> dict:
    """Adapter layers ('unet.<path>' -> Layer) as kohya/LyCORIS tensors, one alpha per module."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        component, path = name.split(".", 1)
        if component not in names:
            raise ModelError(f"{where}: this family has no kohya names for '{component}' (layer '{name}')")
        stem = names[component].key(path)
        for suffix, value in layer.spec.to_kohya(layer, f"{where}: layer '{name}'").items():
            key = f"{stem}.{suffix}"
            if key in out:
                raise ModelError(f"{where}: two layers are named '{key}' in kohya form")
            out[key] = value
    return out


def layout_metadata(names: dict[str, ModuleNames]) -> dict[str, str]:
    """What a reader without the model needs to rebuild module names (the U-Net's block layout)."""
    layouts = {c: n.layout() for c, n in names.items() if n.layout()}
    return {LAYOUT_KEY: json.dumps(layouts["unet"])} if "unet" in layouts else {}


# ------------------------------------------------------------------------------------------- reading
def kohya_layers(tensors: dict[str, torch.Tensor], path: Path | str, names: dict[str, ModuleNames]) -> dict:
    """kohya/LyCORIS tensors -> adapter layers keyed '<component>.<module path>'."""
    spellings = kohya_spellings()
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        stem, _, suffix = key.partition(".")
        if suffix != "alpha" and suffix not in spellings:
            raise ModelError(f"{path}: unknown tensor '{key}' (not a LoRA/LoHa/LoKr layout we can read)")
        grouped.setdefault(stem, {})[suffix] = value
    layers = {}
    for stem, t in grouped.items():
        component, module = _module_of(stem, names, path)
        alpha = t.pop("alpha", None)
        where = f"{path}: '{stem}'"
        if not t:
            raise ModelError(f"{where}: holds only an alpha (a truncated or damaged file?)")
        kind = kind_of_kohya(t, where)
        fields = kind.from_kohya(t, float(alpha.item()) if alpha is not None else None, where)
        layers[f"{component}.{names[component].canonical(module)}"] = Layer(kind.name, **fields)
    return layers


def _module_of(stem: str, names: dict[str, ModuleNames], path) -> tuple[str, str]:
    for component, n in sorted(names.items(), key=lambda cn: -max(len(p) for p in cn[1].prefixes)):
        module = n.path_of(stem)
        if module is not None:
            return component, module
    known = sorted(p for n in names.values() for p in n.prefixes)
    raise ModelError(f"{path}: key '{stem}' names no module this family's LoRAs have (prefixes {known})")


# ------------------------------------------------------------------------------------------ metadata
def prediction(ctx) -> str:
    return "v" if getattr(ctx, "prediction_type", "epsilon") == "v_prediction" else "epsilon"


def kohya_metadata(ctx, cfg, family) -> dict[str, str]:
    """The ss_* keys kohya-trained files carry, and the Stability modelspec keys, that UIs read."""
    from finetune.kinds import get_kind

    targets = cfg.targets if isinstance(cfg.targets, list) else [cfg.targets]
    conv = any(t in ("locon", "conv1", "conv2", "conv_shortcut") for t in targets)
    alpha = cfg.alpha or cfg.rank
    network = get_kind(cfg.adapter).kohya_network(conv, cfg.rank, alpha)
    meta = network_metadata(ctx, family, str(cfg.rank), str(alpha), network)
    meta["ss_text_encoder_lr"] = str(cfg.text_encoder.lr or "") if cfg.text_encoder.enabled else ""
    meta["ss_network_train_unet_only"] = str(not cfg.text_encoder.enabled)
    return meta


def network_metadata(ctx, family, dim: str, alpha: str, network: dict) -> dict[str, str]:
    res = ctx.resolution
    arch = family.modelspec_arch.get(getattr(ctx, "prediction_type", "epsilon"), family.name)
    meta = {
        "ss_base_model_version": family.base_version,
        "ss_v2": str(family.ss_v2),
        "ss_network_module": network["module"],
        "ss_network_dim": dim,
        "ss_network_alpha": alpha,
        "ss_network_args": json.dumps(network["args"]) if network["args"] else "null",
        "ss_output_name": ctx.name,
        "ss_steps": str(ctx.steps),
        "ss_max_train_steps": str(ctx.steps),
        "ss_resolution": f"({res}, {res})",
        "ss_sd_model_name": ctx.base,
        "ss_training_comment": "trained with finetune" + (f"; trigger: {', '.join(ctx.trigger_words)}"
                                                          if ctx.trigger_words else ""),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": ctx.name,
        "modelspec.date": ctx.created,
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.prediction_type": prediction(ctx),
        "modelspec.trigger_phrase": ", ".join(ctx.trigger_words),
    }
    if getattr(ctx, "ui_base_hash", ""):  # AUTOMATIC1111's own hash of a single-file base, or nothing
        meta["ss_sd_model_hash"] = ctx.ui_base_hash
    if getattr(ctx, "tag_frequency", None):  # real counts from the captions, or nothing
        meta["ss_tag_frequency"] = json.dumps(ctx.tag_frequency)
    return meta
