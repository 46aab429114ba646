"""LoRA-family exports.

- `pytorch_lora_weights.safetensors`: diffusers/peft form (`unet.<module>.lora_A.weight`, ...), with the peft
  config in the `lora_adapter_metadata` header so `pipe.load_lora_weights(folder)` keeps alpha. LoRA and DoRA.
- `peft_adapter.safetensors`: LoHa / LoKr (which diffusers cannot load) in peft form with their configs,
  loaded back by `load_peft_adapter`.
- `<name>.safetensors`: the kohya form that ComfyUI and AUTOMATIC1111 load (finetune.export.kohya).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from finetune.errors import ModelError
from finetune.export.card import write_model_card
from finetune.export.context import ExportContext, json_compact
from finetune.export.io import save_safetensors

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
PEFT_FILE = "peft_adapter.safetensors"
ADAPTER_META = "lora_adapter_metadata"  # the header key diffusers reads the peft config from
PEFT_META = "finetune.peft_config"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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


def common_metadata(ctx: ExportContext, extra: dict[str, Any] | None = None) -> dict[str, str]:
    meta = {
        "format": "pt",
        "finetune.version": _version(),
        "finetune.method": ctx.method,
        "finetune.family": ctx.family,
        "finetune.base_model": ctx.base,
        "finetune.base_model_hash": ctx.base_hash,
        "finetune.steps": str(ctx.steps),
        "finetune.resolution": str(ctx.resolution),
        "finetune.dataset_fingerprint": ctx.dataset_fingerprint,
        "finetune.trigger_words": json.dumps(ctx.trigger_words),
        "finetune.recipe": json_compact(ctx.recipe),
        "finetune.created": ctx.created,
    }
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return meta


def _version() -> str:
    from finetune import __version__

    return __version__


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
        "finetune.targets": json.dumps(cfg.unet_targets()),
        "finetune.use_dora": str(cfg.use_dora),
        "finetune.modules": json.dumps(per_module),
    }


def export_lora(comps, method, out_dir: Path, ctx: ExportContext) -> list[Path]:
    cfg = method.config
    tensors, configs = adapter_states(comps, method.trained_modules())
    dtype = DTYPES[ctx.dtype]
    tensors = {k: v.detach().to("cpu", dtype) for k, v in tensors.items()}
    meta = common_metadata(ctx, lora_metadata(cfg, configs))
    written: list[Path] = []
    if "diffusers" in ctx.formats:
        written.append(save_diffusers_lora(tensors, configs, out_dir, meta, cfg.adapter))
    if "kohya" in ctx.formats:
        from finetune.export.kohya import kohya_metadata, peft_to_kohya

        kohya = peft_to_kohya(tensors, configs, comps.family)
        kmeta = meta | kohya_metadata(ctx, cfg) | {PEFT_META: json.dumps(configs)}
        written.append(save_safetensors(kohya, out_dir / f"{ctx.name}.safetensors", kmeta))
    if ctx.model_card:
        written.append(write_model_card(out_dir, ctx, written, kind="lora"))
    return written


def save_diffusers_lora(tensors, configs, out_dir: Path, meta: dict[str, str], adapter: str) -> Path:
    """LoRA/DoRA: the file diffusers' load_lora_weights reads. LoHa/LoKr: a peft file for our loader."""
    packed = {f"{module}.{key}": value for module, cfg in configs.items() for key, value in cfg.items()}
    if adapter == "lora":
        return save_safetensors(transformers_dora_keys(tensors), out_dir / DIFFUSERS_FILE,
                                meta | {ADAPTER_META: json.dumps(packed)})
    return save_safetensors(tensors, out_dir / PEFT_FILE, meta | {PEFT_META: json.dumps(configs)})


def transformers_dora_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Text encoders load through transformers, which keeps a DoRA magnitude only under '...magnitude_vector
    .weight' (diffusers' U-Net path, through peft, takes the bare name): name them so both load it."""
    return {(f"{k}.weight" if not k.startswith("unet.") and k.endswith(".lora_magnitude_vector") else k): v
            for k, v in tensors.items()}


def save_adapter(adapter, out: Path, fmt: str, meta: dict[str, str], family=None) -> Path:
    """Write an `Adapter` (finetune.export.adapters) as 'kohya' (a file) or 'diffusers' (a folder or file)."""
    meta = {k: v for k, v in meta.items() if k not in (ADAPTER_META, PEFT_META)}
    if fmt == "kohya":
        from finetune.export.kohya import layers_to_kohya

        configs = configs_for(adapter.layers)
        return save_safetensors(layers_to_kohya(adapter.layers, family), out, meta | {PEFT_META: json.dumps(configs)})
    configs = configs_for(adapter.layers)
    tensors = {f"{name}.{k}": v for name, layer in adapter.layers.items() for k, v in layer.tensors.items()}
    kind = adapter.kind
    if kind == "mixed":
        raise ModelError(f"{adapter.path}: mixes adapter types; cannot write one peft config per module")
    if out.suffix != ".safetensors":
        return save_diffusers_lora(tensors, configs, out, meta, kind)
    key = ADAPTER_META if kind == "lora" else PEFT_META
    packed = {f"{m}.{k}": v for m, c in configs.items() for k, v in c.items()} if kind == "lora" else configs
    if kind == "lora":
        tensors = transformers_dora_keys(tensors)
    return save_safetensors(tensors, out, meta | {key: json.dumps(packed)})


def configs_for(layers: dict) -> dict[str, dict]:
    """peft configs (as dicts) that rebuild exactly these layers: most common rank/alpha, patterns for the rest."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    by_component: dict[str, dict[str, Any]] = {}
    for name, layer in layers.items():
        component, path = name.split(".", 1)
        by_component.setdefault(component, {})[path] = layer
    configs = {}
    for component, group in by_component.items():
        ranks = {p: _peft_rank(layer) for p, layer in group.items()}
        alphas = {p: layer.scale * ranks[p] for p, layer in group.items()}
        r = Counter(ranks.values()).most_common(1)[0][0]
        alpha = Counter(alphas.values()).most_common(1)[0][0]
        common = dict(r=r, target_modules=sorted(group), rank_pattern={p: v for p, v in ranks.items() if v != r})
        first = next(iter(group.values()))
        if first.kind == "lora":
            cfg = LoraConfig(**common, lora_alpha=alpha, alpha_pattern={p: a for p, a in alphas.items() if a != alpha},
                             use_dora=first.dora)
        else:
            cls = LoHaConfig if first.kind == "loha" else LoKrConfig
            extra = {"decompose_both": any("lokr_w1_a" in v.tensors for v in group.values())} if cls is LoKrConfig else {}
            cfg = cls(**common, alpha=alpha, alpha_pattern={p: a for p, a in alphas.items() if a != alpha}, **extra)
        configs[component] = _config_dict(cfg)
    return configs


def _peft_rank(layer) -> int:
    if layer.rank:
        return int(layer.rank)
    w2 = layer.tensors["lokr_w2"]  # LoKr of two full factors: any r >= half the factor keeps it full in peft
    return int(max(w2.shape[:2]))


def load_peft_adapter(path: str | Path, modules: dict[str, torch.nn.Module], adapter_name: str = "default") -> list[str]:
    """Load a `peft_adapter.safetensors` (any peft adapter type) into the named modules; returns module names."""
    from peft import PeftConfig, inject_adapter_in_model, set_peft_model_state_dict

    from finetune.export.io import read_tensors

    path = Path(path)
    if path.is_dir():
        path = path / PEFT_FILE
    state, meta = read_tensors(path)
    raw = meta.get(PEFT_META)
    if not raw:
        raise ModelError(f"{path}: no '{PEFT_META}' header; not a finetune peft adapter file")
    loaded = []
    for name, cfg in json.loads(raw).items():
        if name not in modules:
            raise ModelError(f"{path}: adapter for '{name}', which the pipeline does not have")
        config = PeftConfig.from_peft_type(**cfg)
        inject_adapter_in_model(config, modules[name], adapter_name=adapter_name)
        sub = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        result = set_peft_model_state_dict(modules[name], sub, adapter_name=adapter_name)
        if getattr(result, "unexpected_keys", None):
            raise ModelError(f"{path}: {len(result.unexpected_keys)} tensors do not fit '{name}' (another base?)")
        loaded.append(name)
    return loaded
