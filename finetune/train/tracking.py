"""What a person watches: the progress bar, scalar logs, the loss history and its plot."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

from tqdm.auto import tqdm


class Progress:
    """A tqdm bar (it/s and ETA built in) with the loss and learning rate; silent off the main process."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str = "train"):
        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True,
                        file=sys.stderr, smoothing=0.1, unit="step")

    def update(self, loss: float, lr: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        self.bar.update(1)

    def write(self, text: str) -> None:
        self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


class LossLog:
    """Appends (step, loss, lr) to logs/loss.csv; on resume it drops rows past the resumed step."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = self.read() if resume_step is not None and path.is_file() else []
        rows = [r for r in rows if r[0] <= (resume_step or 0)]
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "loss", "lr"])
            w.writerows(rows)

    def add(self, step: int, loss: float, lr: float) -> None:
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([step, f"{loss:.6g}", f"{lr:.6g}"])

    def read(self) -> list[tuple[int, float, float]]:
        with self.path.open() as f:
            reader = csv.reader(f)
            next(reader, None)
            return [(int(s), float(v), float(lr)) for s, v, lr in reader]


def plot_loss(rows: list[tuple[int, float, float]], path: Path) -> Path | None:
    """loss.png: the raw loss and a moving average, with the learning rate on a second axis."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r[0] for r in rows]
    losses = [r[1] for r in rows]
    window = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
              for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.plot(steps, losses, color="#9bb7d4", linewidth=0.8, label="loss")
    ax.plot(steps, smooth, color="#1f4e79", linewidth=1.6, label=f"moving average ({window})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if all(v > 0 and math.isfinite(v) for v in losses):
        ax.set_yscale("log")
    ax2 = ax.twinx()
    ax2.plot(steps, [r[2] for r in rows], color="#c55a11", linewidth=0.8, alpha=0.6)
    ax2.set_ylabel("learning rate", color="#c55a11")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("training loss")
    fig.tight_layout()
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path
