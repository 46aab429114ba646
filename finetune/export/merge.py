"""Deployment merges: fuse LoRAs into a base model, or combine several LoRAs into one."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import ModelError
from finetune.export.adapters import Adapter, fuse, read_adapter


@dataclass
class LoraSpec:
    path: Path
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """'file.safetensors' or 'file.safetensors:0.7' (a trailing number after the last ':' is the weight)."""
        import math

        head, sep, tail = text.rpartition(":")
        if sep and head:
            try:
                weight = float(tail)
            except ValueError:
                return cls(Path(text), 1.0)
            if not math.isfinite(weight):
                raise ModelError(f"{text}: weight {tail!r} is not a finite number; give e.g. {head}:0.8")
            return cls(Path(head), weight)
        return cls(Path(text), 1.0)


def read_all(specs: list[LoraSpec], allow_pickle: bool = False, family=None, modules=None) -> list[Adapter]:
    """Read every LoRA; `family` / `modules` (the base they go into) fit the key names to that base."""
    return [read_adapter(s.path, allow_pickle=allow_pickle, family=family, modules=modules) for s in specs]


def fuse_all(comps, adapters: list[Adapter], weights: list[float]) -> int:
    """Fuse every adapter into the components' weights; each file is checked whole before it changes anything.
    A file written for one expert of a base with several (Wan 2.2's low-noise LoRA, header 'finetune.expert')
    goes into that expert."""
    modules = comps.named_modules()
    total = 0
    for a, w in zip(adapters, weights, strict=True):
        slot = comps.family.experts.get(a.metadata.get("finetune.expert", ""))
        target = modules if slot is None else {**modules, comps.family.denoiser_name: modules[slot]}
        total += fuse(a, target, w, comps.family.kohya_names)
    return total


def merge_metadata(specs: list[LoraSpec], adapters: list[Adapter], extra: dict | None = None) -> dict[str, str]:
    sources = [{"file": s.path.name, "weight": s.weight, "format": a.format, "kind": a.kind,
                "base_model": a.metadata.get("finetune.base_model"),
                "trigger_words": json.loads(a.metadata.get("finetune.trigger_words", "[]"))}
               for s, a in zip(specs, adapters, strict=True)]
    words = [w for src in sources for w in src["trigger_words"]]
    meta = {"finetune.merged_from": json.dumps(sources), "finetune.trigger_words": json.dumps(list(dict.fromkeys(words))),
            "modelspec.trigger_phrase": ", ".join(dict.fromkeys(words))}
    for key in ("finetune.family", "finetune.base_model", "finetune.base_model_hash"):
        values = {a.metadata.get(key) for a in adapters} - {None}
        if len(values) == 1:
            meta[key] = values.pop()
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return meta


def merge_into_base(comps, specs: list[LoraSpec], out_dir: Path | None = None, single_file: Path | None = None,
                    allow_pickle: bool = False, dtype: str = "fp32", overwrite: bool = False) -> list[Path]:
    """Fuse LoRAs (with weights) into the base and write a diffusers folder and/or a single-file checkpoint."""
    from finetune.export.full import save_diffusers_folder, save_single_file

    if out_dir is None and single_file is None:
        raise ModelError("nothing to write: give an output folder and/or a single-file path")
    if single_file is not None and single_file.exists() and not overwrite:
        raise ModelError(f"{single_file}: already exists; choose another path or allow overwriting")
    adapters = read_all(specs, allow_pickle, comps.family, comps.named_modules())
    fuse_all(comps, adapters, [s.weight for s in specs])
    from finetune.export.context import public_path

    meta = merge_metadata(specs, adapters, {"finetune.base_model": public_path(comps.base.name),
                                            "finetune.family": comps.family.name})
    written = []
    if out_dir is not None:
        pipe = comps.pipeline()
        written.append(save_diffusers_folder(pipe, out_dir, meta, overwrite=overwrite))
    if single_file is not None:
        written.append(save_single_file(comps, single_file, meta, dtype))
    return written


def combine(specs: list[LoraSpec], rank: int | None = None, energy: float | None = None,
            allow_pickle: bool = False):
    """Several LoRAs -> one: exact concatenation, or SVD-compressed to `rank` / `energy`. (adapter, reports, meta)."""
    from finetune.export.lowrank import concat, resize

    adapters = read_all(specs, allow_pickle)
    merged = concat(adapters, [s.weight for s in specs])
    reports = []
    if rank is not None or energy is not None:
        merged, reports = resize(merged, rank=rank, energy=energy)
    meta = merge_metadata(specs, adapters, {"finetune.method": "lora", "finetune.adapter": "lora"})
    ranks = sorted({layer.rank for layer in merged.layers.values()})
    meta |= {"ss_network_dim": str(ranks[-1]), "ss_network_alpha": str(ranks[-1]),
             "ss_network_module": "networks.lora", "finetune.rank": str(ranks[-1])}
    return merged, reports, meta
