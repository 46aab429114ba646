"""What a weights file is (for tools/inspect_file.py): format, family, method, ranks, targets, trigger words.

A safetensors file is described from its header (names, shapes, dtypes, metadata; alphas read one by one) with
no torch: a second's work for the biggest LoRA. A layout whose reading needs arithmetic (FLUX's BFL names split
fused tensors) and pickle files are read in full.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from finetune.errors import ModelError
from finetune.export.io import read_header_tensors, read_tensors

LDM_MARKERS = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")


def describe_file(path: str | Path, allow_pickle: bool = False) -> dict:
    path = Path(path)
    if path.is_dir():
        return _describe_folder(path, allow_pickle)
    tensors, meta = read_header_tensors(path, allow_pickle)
    try:
        what = _what(path, tensors, meta, read_header_tensors)
    except (TypeError, AttributeError):  # header tensors cannot be sliced or summed: the full read
        tensors, meta = read_tensors(path, allow_pickle)
        what = _what(path, tensors, meta, read_tensors)
    info: dict = {"file": str(path), "tensors": len(tensors),
                  "size_mb": round(sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20, 2),
                  "dtypes": dict(Counter(str(t.dtype).removeprefix("torch.") for t in tensors.values()))}
    info.update(what)
    info["family"] = meta.get("finetune.family") or meta.get("ss_base_model_version") or info.get("family", "unknown")
    info["method"] = meta.get("finetune.method", info.get("method", "unknown"))
    info["base_model"] = meta.get("finetune.base_model") or meta.get("ss_sd_model_name") or "unknown"
    info["trigger_words"] = _triggers(meta)
    info["metadata"] = meta
    return info


def _what(path: Path, tensors, meta, reader) -> dict:
    keys = list(tensors)
    if any(k.startswith(LDM_MARKERS) for k in keys):
        return {"format": "single-file checkpoint (LDM layout)", "method": "full"}
    try:
        from finetune.export.adapters import read_adapter

        adapter = read_adapter(path, allow_pickle=True, reader=reader)
    except ModelError:
        adapter = None
    if adapter is not None:
        return _adapter_info(adapter)
    from finetune.export.embeddings import read_embeddings

    try:
        emb = read_embeddings(path, allow_pickle=True, reader=reader)
    except ModelError:
        emb = None
    if emb is not None:
        return {"format": f"textual-inversion embedding ({emb.format})", "method": "textual_inversion",
                "token": emb.token, "vectors": {n: list(v.shape) for n, v in emb.vectors.items()}}
    if any(k.startswith(("down_blocks.", "up_blocks.", "encoder.", "text_model.", "decoder.")) for k in keys):
        return {"format": "diffusers component weights"}
    raise ModelError(f"{path}: unknown key layout (first key '{keys[0]}'); not a LoRA, embedding or checkpoint")


def _adapter_info(adapter) -> dict:
    ranks = adapter.ranks()
    kind = adapter.kind + ("+dora" if adapter.dora else "")
    targets = Counter(name.split(".", 1)[0] + ":" + name.rsplit(".", 1)[-1] for name in adapter.layers)
    alphas = Counter(round(layer.alpha, 4) for layer in adapter.layers.values())
    return {"format": f"{adapter.format} {kind}", "method": "lora", "adapter": kind,
            "layers": len(adapter.layers), "components": adapter.components(),
            "ranks": dict(sorted(ranks.items())), "alphas": dict(alphas), "targets": dict(sorted(targets.items()))}


def _triggers(meta: dict[str, str]) -> list[str]:
    if "finetune.trigger_words" in meta:
        try:
            return list(json.loads(meta["finetune.trigger_words"]))
        except ValueError:
            pass
    phrase = meta.get("modelspec.trigger_phrase", "")
    return [w.strip() for w in phrase.split(",") if w.strip()]


def _describe_folder(path: Path, allow_pickle: bool) -> dict:
    if (path / "model_index.json").is_file():
        index = json.loads((path / "model_index.json").read_text())
        return {"file": str(path), "format": "diffusers model folder", "pipeline": index.get("_class_name"),
                "components": sorted(k for k in index if not k.startswith("_"))}
    for name in ("pytorch_lora_weights.safetensors", "peft_adapter.safetensors", "learned_embeds.safetensors"):
        if (path / name).is_file():
            return describe_file(path / name, allow_pickle)
    raise ModelError(f"{path}: folder holds no model, LoRA or embedding we know")
