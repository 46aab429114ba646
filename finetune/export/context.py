"""What an export knows about the run that produced it (for metadata and the model card).

Shared files must not carry the trainer's machine: absolute local paths (the base, data folders, the output
folder) are written as '<local>/<last part>' in every header and the card. The base is identified by a hash
of the weights the run actually loaded (`HASH_METHOD`), not by its name.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOCAL = "<local>"
HASH_METHOD = "sha256 of the U-Net weight files: size + safetensors header + 16 evenly spaced 1 MiB samples"
SAMPLES, CHUNK = 16, 2**20


@dataclass
class ExportContext:
    name: str  # file stem of the UI-format files
    recipe: dict[str, Any]
    method: str
    family: str
    base: str
    base_hash: str
    steps: int
    resolution: int
    dataset_fingerprint: str
    trigger_words: list[str] = field(default_factory=list)
    sample_grid: Path | None = None
    dtype: str = "fp32"
    model_card: bool = True
    formats: tuple[str, ...] = ("diffusers",)
    metrics: str | None = None  # markdown table of the run's validation metrics (finetune/eval/run.py)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))
    prediction_type: str = "epsilon"
    #: AUTOMATIC1111's own (legacy) hash of a single-file base, what `ss_sd_model_hash` means there
    ui_base_hash: str = ""
    #: {subset: {tag: images whose caption holds it}} from the captions as written (kohya's ss_tag_frequency)
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    instance_prompts: list[str] = field(default_factory=list)
    #: the recipe's model section as given (local paths included) to reload the base; never written to a file
    model: dict[str, Any] = field(default_factory=dict, repr=False)
    #: the base the export is for (export.target_base / validation.base), when not the trained one
    target: str = ""
    #: how the grids sampled, which the card repeats: steps, guidance, and what the sampling base is
    sampling: dict[str, Any] = field(default_factory=dict)
    #: model.training_adapter's file name: applied while training, not part of the export
    training_adapter: str = ""

    @classmethod
    def from_trainer(cls, t) -> ExportContext:
        r = t.recipe
        out = Path(r.train.output_dir)
        scan = getattr(getattr(t, "data", None), "scan", None)
        return cls(
            name=r.export.name or out.resolve().name or "model",
            recipe=redact(r.resolved()),
            method=r.method.name,
            family=t.comps.family.name,
            base=public_path(r.model.base),
            base_hash=base_hash(t.comps.source, r.model.variant, r.model.revision),
            ui_base_hash=a1111_hash(t.comps.source),
            steps=t.state.step,
            resolution=r.data.resolution,
            dataset_fingerprint=t.state.dataset_fingerprint,
            trigger_words=trigger_words(r, scan.subsets if scan is not None else ()),
            sample_grid=getattr(t, "last_grid", None),
            dtype=r.export.dtype,
            model_card=r.export.model_card,
            formats=tuple(r.export.formats),
            metrics=t.run_metrics.summary() if getattr(t, "run_metrics", None) else None,
            prediction_type=t.comps.prediction_type,
            tag_frequency=tag_frequency(scan.subsets) if scan is not None else {},
            instance_prompts=instance_prompts(r),
            model=r.model.model_dump(),
            **_route_fields(t),
        )


def _route_fields(t) -> dict[str, Any]:
    """What the export is for and how it samples (finetune/routes.py), as ExportContext fields."""
    from finetune.routes import target_base
    from finetune.train.target import grid_settings, sampling_base

    r = t.recipe
    target = target_base(r)
    v = grid_settings(t, r.validation)
    s = sampling_base(t).sampling
    if r.export.target_base and r.export.target_base not in (r.validation.base, r.model.base):
        from finetune.models.base import resolve_base

        s = resolve_base(r.export.target_base).sampling  # configs only; None for a hub id not cached
    sampling = {"steps": v.steps, "guidance": v.guidance_scale}
    if s is not None:
        sampling |= {"what": s.what, "distilled": list(s.distilled)}
    adapter = r.model.training_adapter
    return {"target": public_path(target) if target != r.model.base else "", "sampling": sampling,
            "training_adapter": Path(adapter).name if adapter else ""}


def trigger_words(recipe, subsets=()) -> list[str]:
    """Words a user must put in prompts: caption-rule triggers, new tokens, and `validation.token` when the
    training captions (or instance prompts) hold it. An instance prompt is a whole sentence, not a trigger
    word: it is recorded as such, see `instance_prompts`."""
    words: list[str] = []
    d = recipe.data
    for src in d.sources:
        rules = d.caption_rules(src)
        if rules.trigger:
            words.append(rules.trigger)
    tokens = getattr(recipe.method, "tokens", None)
    if tokens:
        words.extend(t if isinstance(t, str) else getattr(t, "token", str(t)) for t in tokens)
    token = recipe.validation.token
    if token and _captions_hold(token, recipe, subsets):
        words.append(token)
    return list(dict.fromkeys(words))


def _captions_hold(token: str, recipe, subsets) -> bool:
    """The token is in what the subject trained on: instance prompts, caption templates, or the captions of
    the subsets that are not preservation or class images."""
    from finetune.eval.prompts import shows_subject

    d = recipe.data
    texts = [*instance_prompts(recipe), *(d.caption_rules(src).template for src in d.sources)]
    texts += [r.caption for s in subsets if not (s.preserve or s.is_prior) for r in s.records]
    return any(shows_subject(text, token) for text in texts)


def instance_prompts(recipe) -> list[str]:
    prompts = [getattr(src, "instance_prompt", None) or getattr(src, "prompt", None) for src in recipe.data.sources]
    return list(dict.fromkeys(p for p in prompts if p))


def tag_frequency(subsets) -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency: per subset, how many images' captions (as written, comma-separated) hold each tag."""
    out: dict[str, dict[str, int]] = {}
    for s in subsets:
        if getattr(s, "is_prior", False):
            continue
        counts: Counter = Counter()
        for rec in s.records:
            counts.update({t.strip() for t in rec.caption.split(",") if t.strip()})
        if counts:
            out[public_path(str(s.name))] = dict(counts.most_common())
    return out


# ------------------------------------------------------------------------------------------ redaction
def _is_local_path(value: str) -> bool:
    return os.path.isabs(value) or value.startswith(("~", "\\\\")) or (len(value) > 2 and value[1:3] in (":\\", ":/"))


def public_path(value: str) -> str:
    """An absolute (or home-relative) local path as '<local>/<last part>'; anything else unchanged."""
    if not isinstance(value, str) or not _is_local_path(value):
        return value
    return f"{LOCAL}/{Path(value.replace(chr(92), '/')).name}"


def redact(data: Any) -> Any:
    """The recipe with every absolute local path made public (`public_path`)."""
    if isinstance(data, dict):
        return {k: redact(v) for k, v in data.items()}
    if isinstance(data, list):
        return [redact(v) for v in data]
    return public_path(data) if isinstance(data, str) else data


# ---------------------------------------------------------------------------------------------- hashes
def base_hash(source: str, variant: str | None = None, revision: str | None = None) -> str:
    """A digest of the U-Net weights the run loaded (`HASH_METHOD`): fast on multi-GB files, and it changes
    whenever the weights do. '' when the files cannot be found (nothing is invented)."""
    files = unet_files(source, variant, revision)
    if not files:
        return ""
    h = hashlib.sha256()
    for f in files:
        h.update(sampled_digest(f))
    return h.hexdigest()[:16]


def unet_files(source: str, variant: str | None = None, revision: str | None = None) -> list[Path]:
    path = Path(source)
    if path.is_file():
        return [path]
    if not path.is_dir():
        path = _hub_snapshot(source, revision)
        if path is None:
            return []
    sub = "transformer" if (path / "transformer").is_dir() else "unet"  # the denoiser's folder
    files = sorted((path / sub).glob("*.safetensors")) or sorted((path / sub).glob("*.bin"))
    mine = [f for f in files if (f".{variant}." in f.name if variant else "." not in f.stem)]
    return mine or files


def _hub_snapshot(repo: str, revision: str | None) -> Path | None:
    """The local cache folder of a hub base (never downloads)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, revision=revision, local_files_only=True, allow_patterns=["unet/*", "transformer/*"]))
    except Exception:  # noqa: BLE001 - not cached, bad id, offline: the hash is then unknown
        return None


def sampled_digest(path: Path) -> bytes:
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        start = 0
        if path.suffix == ".safetensors" and size >= 8:
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(n, size)))  # every tensor's name, dtype, shape and offsets
            start = 8 + n
        span = max(size - start - CHUNK, 0)
        for i in range(SAMPLES):
            f.seek(start + span * i // max(SAMPLES - 1, 1))
            h.update(f.read(CHUNK))
    return h.digest()


def a1111_hash(source: str) -> str:
    """AUTOMATIC1111's legacy model hash of a single-file base (sha256 of 64 KiB at 1 MiB, 8 hex digits), what
    kohya writes as ss_sd_model_hash; '' for a diffusers folder or hub base, which has no such hash."""
    path = Path(source)
    if not path.is_file():
        return ""
    with path.open("rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


# ---------------------------------------------------------------------------------------------- metadata
def common_metadata(ctx: ExportContext, extra: dict[str, Any] | None = None) -> dict[str, str]:
    meta = {
        "format": "pt",
        "finetune.version": _version(),
        "finetune.method": ctx.method,
        "finetune.family": ctx.family,
        "finetune.base_model": ctx.base,
        "finetune.base_model_hash": ctx.base_hash,
        "finetune.base_model_hash_method": HASH_METHOD,
        "finetune.prediction_type": ctx.prediction_type,
        "finetune.steps": str(ctx.steps),
        "finetune.resolution": str(ctx.resolution),
        "finetune.dataset_fingerprint": ctx.dataset_fingerprint,
        "finetune.trigger_words": json.dumps(ctx.trigger_words),
        "finetune.recipe": json_compact(ctx.recipe),
        "finetune.created": ctx.created,
    }
    if ctx.instance_prompts:
        meta["finetune.instance_prompts"] = json.dumps(ctx.instance_prompts)
    meta |= route_metadata(ctx)
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return meta


def route_metadata(ctx: ExportContext) -> dict[str, str]:
    """The base the export is for and how to sample it; the training adapter it was trained through (not in it)."""
    meta: dict[str, str] = {}
    if ctx.target:
        meta["finetune.target_base"] = ctx.target
    if ctx.sampling:
        meta["finetune.sampling"] = json.dumps(ctx.sampling, sort_keys=True)
        steps, guidance = ctx.sampling.get("steps"), ctx.sampling.get("guidance")
        hint = f"{steps} steps" + (f", guidance {guidance:g}" if guidance is not None else "")
        meta["modelspec.usage_hint"] = f"for {ctx.target or ctx.base}: {hint}"
    if ctx.training_adapter:
        meta["finetune.training_adapter"] = ctx.training_adapter
    return meta


def _version() -> str:
    from finetune import __version__

    return __version__


def json_compact(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), sort_keys=True, default=str)


def export_targets(recipe) -> list[str]:
    """The names an export of this recipe may write into the output folder (checked before a run starts,
    so a folder that is not a run folder never has a README.md or a .safetensors overwritten)."""
    from finetune.export.layers import DIFFUSERS_FILE, PEFT_FILE

    name = recipe.export.name or Path(recipe.train.output_dir).resolve().name or "model"
    names = [f"{name}.safetensors", f"{name}_emb.safetensors", DIFFUSERS_FILE, PEFT_FILE,
             "learned_embeds.safetensors", "learned_embeds_2.safetensors", "model"]
    return (["README.md"] if recipe.export.model_card else []) + names
