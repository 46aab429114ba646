"""Score generated images: rows of images (one row per prompt) against fixed reference images.

    scorer = Scorer(["clip_i", "clip_t", "dino"], EvalModels("toy", "toy"), references, token="sks")
    scores = scorer.score(rows, prompts)          # scores.overall["dino"].mean, scores.rows[0]["clip_t"]

CLIP-I and DINO average the rows whose prompt shows the subject (finetune.eval.prompts.shows_subject);
CLIP-T averages every row. Per-row values are kept for all metrics, so a subject leaking into an unrelated
prompt shows as that row's CLIP-I rising.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from finetune.eval import METRIC_NAMES as METRICS
from finetune.eval.embedders import EvalModels
from finetune.eval.formulas import Estimate, bootstrap, prompt_fidelity, subject_fidelity
from finetune.eval.prompts import clip_text, shows_subject

LABELS = {"clip_i": "CLIP-I", "clip_t": "CLIP-T", "dino": "DINO"}
SUBJECT_METRICS = ("clip_i", "dino")


@dataclass
class Scores:
    overall: dict[str, Estimate]
    rows: list[dict] = field(default_factory=list)  # {"prompt", "subject", metric: mean over the row}

    def means(self) -> dict[str, float]:
        return {m: e.mean for m, e in self.overall.items()}

    def to_json(self) -> dict:
        return {"overall": {m: e.as_dict() for m, e in self.overall.items()}, "rows": self.rows}

    @classmethod
    def from_json(cls, data: dict) -> Scores:
        return cls({m: Estimate(**e) for m, e in data["overall"].items()}, list(data.get("rows", [])))

    def line(self) -> str:
        return ", ".join(f"{LABELS[m]} {e}" for m, e in self.overall.items())


class Scorer:
    """`row_targets` (edit pairs): each row's own target image, or None; CLIP-I and DINO then compare a row's
    images with its target, over the rows that have one, instead of with shared references."""

    def __init__(self, metrics, models: EvalModels, references: list, token: str | None = None,
                 class_word: str | None = None, device="cpu", row_targets: list | None = None):
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; known: {', '.join(METRICS)}")
        self.row_targets = row_targets
        if row_targets is not None:
            references = [t for t in row_targets if t is not None]
        if not references and any(m in SUBJECT_METRICS for m in metrics):
            raise ValueError("CLIP-I and DINO need reference images" + (" (validation.targets)" if row_targets
                                                                         is not None else ""))
        self.metrics = [m for m in METRICS if m in metrics]  # a fixed order for tables and plots
        self.models, self.references, self.device = models, references, device
        self.token, self.class_word = token, class_word
        self._ref: dict[str, torch.Tensor] = {}

    def _embedder(self, metric: str):
        return self.models.dino if metric == "dino" else self.models.clip

    def _references(self, metric: str) -> torch.Tensor:
        if metric not in self._ref:  # the references never change: embed them once
            self._ref[metric] = self._embedder(metric).images(self.references)
        return self._ref[metric]

    def per_image(self, rows: list[list], prompts: list[str]) -> dict[str, list[torch.Tensor]]:
        """{metric: [values of row r's images]}: the raw material of every average."""
        flat = [im for row in rows for im in row]
        sizes = [len(row) for row in rows]
        out: dict[str, list[torch.Tensor]] = {}
        embedded: dict[int, torch.Tensor] = {}  # CLIP-I and CLIP-T share one pass of the CLIP image tower
        with self.models.on(self.device):
            for metric in self.metrics:
                embedder = self._embedder(metric)
                if id(embedder) not in embedded:
                    embedded[id(embedder)] = embedder.images(flat)
                emb = embedded[id(embedder)]
                if metric == "clip_t":
                    texts = [clip_text(p, self.token, self.class_word) for p, n in zip(prompts, sizes, strict=True)
                             for _ in range(n)]
                    values = prompt_fidelity(emb, self.models.clip.texts(texts))
                elif self.row_targets is not None:  # each row against its own target (none: no values)
                    out[metric] = self._against_targets(emb, sizes, self._references(metric))
                    continue
                else:
                    values = subject_fidelity(emb, self._references(metric))
                out[metric] = list(torch.split(values, sizes))
        return out

    def _against_targets(self, emb: torch.Tensor, sizes: list[int], targets: torch.Tensor) -> list[torch.Tensor]:
        out, k = [], 0
        for row, target in zip(torch.split(emb, sizes), self.row_targets, strict=True):
            if target is None:
                out.append(torch.full((len(row),), float("nan")))
                continue
            out.append(subject_fidelity(row, targets[k : k + 1]))
            k += 1
        return out

    def score(self, rows: list[list], prompts: list[str]) -> Scores:
        if len(rows) != len(prompts):
            raise ValueError(f"{len(rows)} rows of images but {len(prompts)} prompts")
        values = self.per_image(rows, prompts)
        subject = ([t is not None for t in self.row_targets] if self.row_targets is not None
                   else [shows_subject(p, self.token) for p in prompts])
        overall = {}
        for metric, per_row in values.items():
            keep = [v for v, s in zip(per_row, subject, strict=True) if s or metric not in SUBJECT_METRICS]
            if keep:
                overall[metric] = bootstrap(torch.cat(keep).numpy())
        table = [{"prompt": p, "subject": s, **{m: float(values[m][i].mean()) for m in values
                                                if not torch.isnan(values[m][i]).any()}}
                 for i, (p, s) in enumerate(zip(prompts, subject, strict=True))]
        return Scores(overall, table)
