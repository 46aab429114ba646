"""What an export knows about the run that produced it (for metadata and the model card)."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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

    @classmethod
    def from_trainer(cls, t) -> ExportContext:
        r = t.recipe
        out = Path(r.train.output_dir)
        return cls(
            name=r.export.name or out.resolve().name,
            recipe=r.resolved(),
            method=r.method.name,
            family=t.comps.family.name,
            base=r.model.base,
            base_hash=base_hash(t.comps.source),
            steps=t.state.step,
            resolution=r.data.resolution,
            dataset_fingerprint=t.state.dataset_fingerprint,
            trigger_words=trigger_words(r),
            sample_grid=getattr(t, "last_grid", None),
            dtype=r.export.dtype,
            model_card=r.export.model_card,
            formats=tuple(r.export.formats),
            metrics=t.run_metrics.summary() if getattr(t, "run_metrics", None) else None,
        )


def trigger_words(recipe) -> list[str]:
    """Words a user must put in prompts: caption-rule triggers, instance prompts' rare tokens, new tokens."""
    words: list[str] = []
    d = recipe.data
    for src in d.sources:
        rules = d.caption_rules(src)
        if rules.trigger:
            words.append(rules.trigger)
        for prompt in (getattr(src, "instance_prompt", None), getattr(src, "prompt", None)):
            if prompt:
                words.append(prompt)
    tokens = getattr(recipe.method, "tokens", None)
    if tokens:
        words.extend(t if isinstance(t, str) else getattr(t, "token", str(t)) for t in tokens)
    return list(dict.fromkeys(words))


def base_hash(source: str) -> str:
    """sha256 of the base's U-Net weights (first 64 MiB + size: fast on multi-GB files), or of the file."""
    path = Path(source)
    if path.is_dir():
        files = sorted((path / "unet").glob("*.safetensors")) or sorted((path / "unet").glob("*"))
        path = files[0] if files else path / "model_index.json"
    if not path.is_file():
        return hashlib.sha256(source.encode()).hexdigest()[:16]
    h = hashlib.sha256()
    h.update(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(64 * 2**20))
    return h.hexdigest()[:16]


def json_compact(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), sort_keys=True, default=str)
