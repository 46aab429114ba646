"""LoRA-family exports.

- `pytorch_lora_weights.safetensors`: diffusers/peft form (`unet.<module>.lora_A.weight`, ...), with the peft
  config in the `lora_adapter_metadata` header so `pipe.load_lora_weights(folder)` keeps alpha; for kinds
  diffusers loads (LoRA, DoRA).
- `peft_adapter.safetensors`: other kinds (LoHa, LoKr, ...) in peft form with their configs, loaded back by
  `load_peft_adapter`.
- `<name>.safetensors`: the kohya form that ComfyUI and AUTOMATIC1111 load (finetune.export.kohya).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from finetune.errors import ModelError
from finetune.export.adapters import ADAPTER_META, DIFFUSERS_FILE, PEFT_FILE, PEFT_META, peft_layers
from finetune.export.card import write_model_card
from finetune.export.context import ExportContext, common_metadata
from finetune.export.io import DTYPES, read_tensors, save_safetensors
from finetune.export.kohya import kohya_metadata, layers_to_kohya, layout_metadata
from finetune.export.layouts import bound_names
from finetune.kinds import get_kind

__all__ = ["DIFFUSERS_FILE", "PEFT_FILE", "PEFT_META", "ADAPTER_META", "export_lora", "save_adapter",
           "configs_for", "load_peft_adapter", "common_metadata"]


def adapter_states(comps, module_names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Trained adapter tensors prefixed by module name, and each module's peft config as a dict."""
    from peft.utils import get_peft_model_state_dict

    modules = comps.named_modules()
    tensors: dict[str, torch.Tensor] = {}
    configs: dict[str, dict] = {}
    for name in module_names:
        module = modules[name]
        # not the embedding table: peft adds it when the vocabulary grew (pivotal); the new rows export as an embedding
        for k, v in get_peft_model_state_dict(module, save_embedding_layers=False).items():
            tensors[f"{name}.{k}"] = v
        configs[name] = _config_dict(module.peft_config["default"])
    return tensors, configs


def _config_dict(config) -> dict[str, Any]:
    data = config.to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in data.items()}


def lora_metadata(cfg, configs: dict[str, dict]) -> dict[str, str]:
    """rank / alpha / targets of the run, per trained module too (text encoders may differ)."""
    per_module = {
        name: {"r": c.get("r"), "alpha": c.get("lora_alpha", c.get("alpha")), "targets": c.get("target_modules")}
        for name, c in configs.items()
    }
    return {
        "finetune.adapter": cfg.adapter,
        "finetune.rank": str(cfg.rank),
        "finetune.alpha": str(cfg.alpha or cfg.rank),
        "finetune.targets": json.dumps(cfg.targets),
        "finetune.use_dora": str(cfg.use_dora),
        "finetune.modules": json.dumps(per_module),
    }


def export_lora(comps, method, out_dir: Path, ctx: ExportContext, replaced: dict | None = None) -> list[Path]:
    """`replaced`: whole trained weights ('<module>.<parameter path>') written beside the adapter in the diffusers
    file, which diffusers' loader writes into the model (a FLUX Control LoRA's norm scales)."""
    cfg = method.config
    all_tensors, all_configs = adapter_states(comps, method.trained_modules())
    names = bound_names(comps.family.kohya_names, comps.named_modules())
    written: list[Path] = []
    # one file set per group: everything at once, or (Wan 2.2) each expert under its own suffix
    for suffix, renamed in comps.family.export_groups(method.trained_modules()):
        tensors = {f"{renamed[m]}.{k}": v.detach().to("cpu", DTYPES[ctx.dtype])
                   for key, v in all_tensors.items() for m, k in [key.split(".", 1)] if m in renamed}
        configs = {renamed[m]: c for m, c in all_configs.items() if m in renamed}
        meta = common_metadata(ctx, lora_metadata(cfg, configs)) | layout_metadata(names)
        meta |= {"finetune.expert": suffix.lstrip("_")} if suffix else {}
        whole = {k: v.detach().to("cpu", DTYPES[ctx.dtype]).contiguous() for k, v in (replaced or {}).items()}
        written += _write_lora_files(comps, cfg, ctx, out_dir, suffix, tensors, configs, names, meta, whole)
    if ctx.model_card:
        written.append(write_model_card(out_dir, ctx, written, kind="lora", dora=cfg.use_dora))
    return written


def _write_lora_files(comps, cfg, ctx, out_dir: Path, suffix: str, tensors, configs, names, meta,
                      whole: dict | None = None) -> list[Path]:
    written: list[Path] = []
    if "diffusers" in ctx.formats:
        written.append(save_diffusers_lora({**tensors, **(whole or {})}, configs, out_dir, meta, cfg.adapter, suffix))
    if "kohya" in ctx.formats:
        layers = peft_layers(tensors, configs, "trained adapter")
        kohya = layers_to_kohya(layers, names, "trained adapter")
        kmeta = meta | kohya_metadata(ctx, cfg, comps.family) | {PEFT_META: json.dumps(configs)}
        written.append(save_safetensors(kohya, out_dir / f"{ctx.name}{suffix}.safetensors", kmeta))
    for fmt in family_layouts(comps.family):  # the family's own layouts (FLUX: 'bfl'), '<name>_<fmt>.safetensors'
        if fmt in ctx.formats:
            layers = peft_layers(tensors, configs, "trained adapter")
            out = layout_module(comps.family, fmt).write(layers, names, "trained adapter")
            written.append(save_safetensors(out, out_dir / f"{ctx.name}{suffix}_{fmt}.safetensors",
                                            meta | kohya_metadata(ctx, cfg, comps.family) | {LAYOUT_META: fmt}))
    return written


def save_diffusers_lora(tensors, configs, out_dir: Path, meta: dict[str, str], adapter: str,
                        suffix: str = "") -> Path:
    """Kinds diffusers loads: the file `load_lora_weights` reads. Others: a peft file for our loader.
    `suffix` goes before the extension (Wan 2.2's low-noise expert: '_low_noise')."""
    def named(file: str) -> Path:
        return out_dir / file.replace(".safetensors", f"{suffix}.safetensors")

    if get_kind(adapter).diffusers_file:
        packed = {f"{module}.{key}": value for module, cfg in configs.items() for key, value in cfg.items()}
        return save_safetensors(transformers_dora_keys(tensors), named(DIFFUSERS_FILE),
                                meta | {ADAPTER_META: json.dumps(packed)})
    return save_safetensors(tensors, named(PEFT_FILE), meta | {PEFT_META: json.dumps(configs)})


def transformers_dora_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Text encoders load through transformers, which keeps a DoRA magnitude only under '...magnitude_vector
    .weight' (diffusers' U-Net path, through peft, takes the bare name): name them so both load it."""
    return {(f"{k}.weight" if not k.startswith("unet.") and k.endswith(".lora_magnitude_vector") else k): v
            for k, v in tensors.items()}


def save_adapter(adapter, out: Path, fmt: str, meta: dict[str, str], family=None) -> Path:
    """Write an `Adapter` (finetune.export.layers) as 'kohya' (a file), 'diffusers' (a folder or file) or one
    of the family's own layouts (FLUX: 'bfl')."""
    from finetune.models.families import FAMILIES

    family = family or FAMILIES[adapter.family or "sd1"]
    meta = {k: v for k, v in meta.items() if k not in (ADAPTER_META, PEFT_META, LAYOUT_META)}
    names = bound_names(family.kohya_names, meta=adapter.metadata)
    if adapter.replaced and fmt != "diffusers":
        raise ModelError(f"{adapter.path}: carries whole norm weights (a Control LoRA trained with "
                         f"train_norm_layers), which the {fmt} layout has no place for; keep the diffusers file")
    if fmt in family_layouts(family):
        tensors = layout_module(family, fmt).write(adapter.layers, names, str(adapter.path))
        return save_safetensors(tensors, out, meta | {LAYOUT_META: fmt})
    if fmt == "kohya":
        tensors = layers_to_kohya(adapter.layers, names, str(adapter.path))
        configs = configs_for(adapter.layers)
        return save_safetensors(tensors, out, meta | layout_metadata(names) | {PEFT_META: json.dumps(configs)})
    layers = runtime_layers(adapter.layers, names)  # peft configs and diffusers name modules as models have them
    configs = configs_for(layers)
    tensors = {f"{name}.{k}": v for name, layer in layers.items() for k, v in layer.tensors.items()}
    tensors |= adapter.replaced  # whole weights keep their model names, as diffusers' loader reads them
    kind = adapter.kind
    if kind == "mixed":
        raise ModelError(f"{adapter.path}: mixes adapter kinds; cannot write one peft config per module")
    if out.suffix != ".safetensors":
        return save_diffusers_lora(tensors, configs, out, meta, kind)
    if get_kind(kind).diffusers_file:
        packed = {f"{m}.{k}": v for m, c in configs.items() for k, v in c.items()}
        return save_safetensors(transformers_dora_keys(tensors), out, meta | {ADAPTER_META: json.dumps(packed)})
    return save_safetensors(tensors, out, meta | {PEFT_META: json.dumps(configs)})


LAYOUT_META = "finetune.lora_layout"  # a family layout's name in the file header ('bfl')


def family_layouts(family) -> list[str]:
    return list(getattr(family, "lora_layouts", {}) or {})


def layout_module(family, fmt: str):
    """The module that reads / writes one of a family's own LoRA layouts (detect, read, write)."""
    import importlib

    return importlib.import_module(family.lora_layouts[fmt])


def runtime_layers(layers: dict, names) -> dict:
    def spelled(name: str) -> str:
        component, path = name.split(".", 1)
        return f"{component}.{names[component].runtime(path)}" if component in names else name

    return {spelled(n): layer for n, layer in layers.items()}


def configs_for(layers: dict) -> dict[str, dict]:
    """peft configs (as dicts) that rebuild exactly these layers: most common rank/alpha, patterns for the rest."""
    by_component: dict[str, dict[str, Any]] = {}
    for name, layer in layers.items():
        component, path = name.split(".", 1)
        by_component.setdefault(component, {})[path] = layer
    configs = {}
    for component, group in by_component.items():
        kinds = {layer.kind for layer in group.values()}
        if len(kinds) != 1:
            raise ModelError(f"'{component}' mixes adapter kinds {sorted(kinds)}; one peft config cannot hold them")
        kind = get_kind(kinds.pop())
        ranks = {p: kind.peft_rank(layer) for p, layer in group.items()}
        alphas = {p: layer.scale * ranks[p] for p, layer in group.items()}
        r = Counter(ranks.values()).most_common(1)[0][0]
        alpha = Counter(alphas.values()).most_common(1)[0][0]
        common = dict(r=r, target_modules=sorted(group), rank_pattern={p: v for p, v in ranks.items() if v != r})
        cfg = kind.rebuild_config(common, alpha, {p: a for p, a in alphas.items() if a != alpha}, list(group.values()))
        configs[component] = _config_dict(cfg)
    return configs


def load_peft_adapter(path: str | Path, modules: dict[str, torch.nn.Module], adapter_name: str = "default",
                      names=None) -> list[str]:
    """Load a `peft_adapter.safetensors` (any peft adapter type) into the named modules; returns module names.
    `names`: the base family's key table, to find modules whatever transformers version wrote the file.
    The whole file is checked (every layer whole, every module its config targets present) before any module
    changes."""
    from peft import PeftConfig, inject_adapter_in_model, set_peft_model_state_dict

    from finetune.export.adapters import check_complete, read_adapter
    from finetune.export.layouts import ModuleNames

    path = Path(path)
    if path.is_dir():
        path = path / PEFT_FILE
    adapter = read_adapter(path)  # each layer checked by its kind: a lacking tensor is named
    raw = adapter.metadata.get(PEFT_META)
    if not raw:
        raise ModelError(f"{path}: no '{PEFT_META}' header; not a finetune peft adapter file")
    configs = json.loads(raw)
    absent = [n for n in configs if n not in modules]
    if absent:
        raise ModelError(f"{path}: adapter for '{absent[0]}', which the pipeline does not have")
    tables = {n: (names or {}).get(n) or ModuleNames(n) for n in configs}
    check_complete(adapter, modules, tables)
    state, _ = read_tensors(path)
    for name, cfg in configs.items():
        module = modules[name]
        cfg, sub = _fit(cfg, {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")},
                        module, (names or {}).get(name))
        inject_adapter_in_model(PeftConfig.from_peft_type(**cfg), module, adapter_name=adapter_name)
        result = set_peft_model_state_dict(module, sub, adapter_name=adapter_name)
        if getattr(result, "unexpected_keys", None):
            raise ModelError(f"{path}: {len(result.unexpected_keys)} tensors do not fit '{name}' (another base?)")
    return list(configs)


def _fit(cfg: dict, state: dict, module, table) -> tuple[dict, dict]:
    """Config and tensor names spelled as this module names its submodules (a file written with one
    transformers version, e.g. with CLIP's `text_model.` level, loads into another)."""
    if table is None:
        return cfg, state
    actual = {id(m): p for p, m in module.named_modules()}

    def fit(path: str) -> str:
        try:
            return actual.get(id(table.locate(module, path)), path)
        except AttributeError:
            return path

    cfg = dict(cfg)
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = [fit(t) for t in cfg["target_modules"]]
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            cfg[key] = {fit(k): v for k, v in cfg[key].items()}
    spellings = {}
    for k, v in state.items():
        head, tail = _split_tensor_key(k)
        spellings[f"{fit(head)}.{tail}" if head else k] = v
    return cfg, spellings


def _split_tensor_key(key: str) -> tuple[str, str]:
    from finetune.kinds import peft_spellings

    for s in peft_spellings():
        if key.endswith("." + s):
            return key[: -len(s) - 1], s
    return "", key
