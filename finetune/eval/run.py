"""Metrics during a training run: each validation grid scored against the run's reference images, kept in
`samples/metrics.json`, plotted in `metrics.png`, summarised for the model card, and the best step picked
for `train.keep_best`. Main process only; the trainer calls `record` from its validation hook.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from finetune.eval.references import reference_images
from finetune.eval.scoring import LABELS, Scorer, Scores

BEST_PREFIX = "best-step-"


def objective_weights(keep_best) -> dict[str, float]:
    """train.keep_best as {metric: weight}: 'clip_i' -> {'clip_i': 1.0}; a mapping stays a mapping."""
    if keep_best is None:
        return {}
    return {keep_best: 1.0} if isinstance(keep_best, str) else dict(keep_best)


class RunMetrics:
    def __init__(self, recipe, out: Path, device, dtype, resume_step: int | None = None):
        v = recipe.validation
        self.recipe, self.device, self.dtype = recipe, device, dtype
        self.metrics = list(v.metrics)
        self.weights = objective_weights(recipe.train.keep_best)
        self.out = Path(out)
        self.path = self.out / "samples" / "metrics.json"
        self.plot_path = self.out / "metrics.png"
        self.history: dict[int, Scores] = {}
        self.n_references: int | None = None
        if resume_step is not None and self.path.is_file():  # a resumed run keeps what it measured before
            saved = json.loads(self.path.read_text())
            self.history = {int(s): Scores.from_json(d) for s, d in saved.get("steps", {}).items()
                            if int(s) <= resume_step}
            self.n_references = saved.get("references")
        if resume_step is not None:  # steps after the checkpoint are trained again: their kept export goes too
            for old in self.out.glob(f"{BEST_PREFIX}*"):
                step = old.name.removeprefix(BEST_PREFIX)
                if old.is_dir() and step.isdigit() and int(step) > resume_step:
                    shutil.rmtree(old, ignore_errors=True)
        self._scorer: Scorer | None = None
        self.temporal: dict[int, float] = {}  # video runs: mean temporal consistency of the clips per step

    @property
    def scorer(self) -> Scorer:
        if self._scorer is None:  # references and models load on the first grid, not at start-up
            from finetune.eval.embedders import EvalModels

            v = self.recipe.validation
            from tqdm.auto import tqdm

            tqdm.write(f"metrics: loading the metric models (clip {v.clip_model}, dino {v.dino_model}) and the "
                       "reference images; once, at the first grid", file=sys.stderr)
            models = EvalModels(v.clip_model, v.dino_model, self.dtype,
                                keys=("validation.clip_model", "validation.dino_model"))
            if v.images:  # edit pairs: subject fidelity to each row's own target, where it has one
                from finetune.train.edits import target_images

                self._scorer = Scorer(self.metrics, models, [], v.token, v.class_word, self.device,
                                      row_targets=target_images(self.recipe))
            else:
                self._scorer = Scorer(self.metrics, models, reference_images(self.recipe), v.token, v.class_word,
                                      self.device)
            self.n_references = len(self._scorer.references)
        return self._scorer

    # ------------------------------------------------------------------------------------------- record
    def record(self, rows: list[list], step: int) -> Scores:
        """Score one grid, store it, rewrite metrics.json and metrics.png. A video run's rows hold clips: every
        frame is scored as an image (CLIP-T per frame, averaged; CLIP-I / DINO against the references likewise)
        and the clips' temporal consistency is kept beside (finetune/eval/video.py)."""
        clips = isinstance(rows[0][0], list)
        frames = [[f for clip in row for f in clip] for row in rows] if clips else rows
        scores = self.scorer.score(frames, self.recipe.validation.prompts)
        self.history[step] = scores
        if clips:
            from finetune.eval.video import temporal_consistency

            model = self.scorer.models.clip
            values = [temporal_consistency(model, clip) for row in rows for clip in row]
            self.temporal[step] = sum(values) / len(values)
        self._write()
        return scores

    def _write(self) -> None:
        from finetune.export.io import write_text_atomic

        v = self.recipe.validation
        data = {
            "metrics": self.metrics,
            "models": {"clip": v.clip_model, "dino": v.dino_model},
            "references": self.n_references,
            "interval": "95% percentile bootstrap over generated images (2000 resamples, seed 0)",
            "keep_best": self.weights or None,
            "best_step": self.best_step(),
            "steps": {str(s): sc.to_json() for s, sc in sorted(self.history.items())},
        }
        if self.temporal:
            data["temporal_consistency"] = {str(s): round(v, 4) for s, v in sorted(self.temporal.items())}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(data, indent=2))
        plot_metrics(self.history, self.plot_path, self.best_step())

    def line(self, step: int, scores: Scores) -> str:
        best = self.best_step()
        mark = " (best so far)" if best == step and self.weights else ""
        temporal = f", temporal consistency {self.temporal[step]:.3f}" if step in self.temporal else ""
        return f"step {step}: {scores.line()}{temporal}{mark}"

    @staticmethod
    def scalars(scores: Scores) -> dict[str, float]:
        return {f"metrics/{m}": e.mean for m, e in scores.overall.items()}

    # --------------------------------------------------------------------------------------- best step
    def objective(self, scores: Scores) -> float | None:
        if not self.weights or any(m not in scores.overall for m in self.weights):
            return None
        return sum(w * scores.overall[m].mean for m, w in self.weights.items())

    def best_step(self) -> int | None:
        """The step with the highest keep_best objective; step 0 (the untouched base) never counts."""
        scored = [(self.objective(sc), s) for s, sc in self.history.items() if s > 0]
        scored = [(v, s) for v, s in scored if v is not None]
        return max(scored, key=lambda vs: (vs[0], -vs[1]))[1] if scored else None  # ties: the earlier step

    def keep_best(self, step: int, write) -> Path:
        """`write(folder)` exports the current weights; the folder becomes best-step-NNNNNN and earlier
        best folders go (only after the new one is complete)."""
        final = self.out / f"{BEST_PREFIX}{step:06d}"
        tmp = self.out / f".{final.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in self.out.glob(f"{BEST_PREFIX}*"):
            if old != final and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
        return final

    # ----------------------------------------------------------------------------------------- summary
    def summary(self) -> str | None:
        """A markdown table of every validation step for the model card."""
        if not self.history:
            return None
        v = self.recipe.validation
        metrics = [m for m in self.metrics if any(m in sc.overall for sc in self.history.values())]
        best = self.best_step()
        head = "| step | " + " | ".join(LABELS[m] for m in metrics) + " |\n" + "|---" * (len(metrics) + 1) + "|\n"
        lines = []
        for s, sc in sorted(self.history.items()):
            label = f"{s} (base)" if s == 0 else f"**{s} (best)**" if s == best and self.weights else str(s)
            cells = [str(sc.overall[m]) if m in sc.overall else "" for m in metrics]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        kept = (f"\nThe best step's weights are kept in `{BEST_PREFIX}{best:06d}/` (train.keep_best: "
                f"{json.dumps(self.weights)}).\n" if best is not None and self.weights else "")
        return (f"Validation grids scored against {self.n_references} reference images with CLIP "
                f"`{v.clip_model}` and DINO `{v.dino_model}`: cosine similarities, mean [95% bootstrap interval "
                "over images]. CLIP-I and DINO: subject fidelity; CLIP-T: prompt fidelity.\n\n"
                + head + "\n".join(lines) + "\n" + kept)


def plot_metrics(history: dict[int, Scores], path: Path, best: int | None = None) -> Path | None:
    """metrics.png: one panel per metric, the mean over steps with its interval as a band."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(history)
    metrics = [m for m in LABELS if any(m in history[s].overall for s in steps)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 3.2), dpi=100, squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        xs = [s for s in steps if m in history[s].overall]
        est = [history[s].overall[m] for s in xs]
        ax.fill_between(xs, [e.low for e in est], [e.high for e in est], color="#9bb7d4", alpha=0.5, linewidth=0)
        ax.plot(xs, [e.mean for e in est], color="#1f4e79", marker="o", markersize=3, linewidth=1.5)
        if best is not None:
            ax.axvline(best, color="#c55a11", linestyle="--", linewidth=1, label=f"best: step {best}")
            ax.legend(loc="lower right", fontsize=7)
        ax.set_title(LABELS[m])
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("cosine similarity")
    fig.tight_layout()
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path
