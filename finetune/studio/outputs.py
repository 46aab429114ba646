"""What a run folder holds, read for the run page: loss history, sample grids, toy scores, exports, progress.

Every file here is written by the trainer (finetune/train/); the studio only reads. Speed and ETA are the
trainer's own numbers, taken from the progress bar it prints to the run log.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Any

_BAR = re.compile(r"(\d+)/(\d+) \[([0-9:]+)<([0-9:?]+),\s*([0-9.]+|\?)\s*(step/s|s/step)")
_GRID = re.compile(r"step-(\d+)\.png$")
TAIL_BYTES = 64 * 1024


def loss_rows(out: Path, after_step: int = -1) -> list[list[float]]:
    """[step, loss, lr] rows of logs/loss.csv with step > after_step."""
    path = out / "logs" / "loss.csv"
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="") as f:
        for row in csv.reader(f):
            if len(row) != 3 or not row[0].isdigit():
                continue  # the header, or a row the trainer is writing right now
            try:
                step, loss, lr = int(row[0]), float(row[1]), float(row[2])
            except ValueError:
                continue
            if step > after_step:
                rows.append([step, loss, lr])
    return rows


def grids(out: Path) -> list[dict[str, Any]]:
    folder = out / "samples"
    found = [(int(m.group(1)), p.name) for p in folder.glob("step-*.png") if (m := _GRID.search(p.name))]
    return [{"step": s, "file": f"samples/{name}"} for s, name in sorted(found)]


def scores(out: Path) -> dict[str, dict[str, float]]:
    path = out / "samples" / "scores.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}  # being replaced right now: the next poll reads it


def exports(out: Path) -> list[dict[str, Any]]:
    """The files a finished run leaves at the top of its folder (weights, model card, loss plot)."""
    if not out.is_dir():
        return []
    keep = (".safetensors", ".md", ".png", ".yaml", ".json")
    files = [p for p in sorted(out.iterdir()) if p.is_file() and p.suffix in keep and not p.name.startswith(".")]
    return [{"file": p.name, "bytes": p.stat().st_size} for p in files]


def checkpoints(out: Path) -> list[str]:
    from finetune.train.checkpoint import checkpoint_root, complete_checkpoints

    root = checkpoint_root(out)
    return [p.name for p in complete_checkpoints(root)] if root.is_dir() else []


def read_tail(path: Path, limit: int = TAIL_BYTES, start: int = 0) -> str:
    """The last `limit` bytes of a log, never reading before byte `start`."""
    if not path.is_file():
        return ""
    with path.open("rb") as f:
        f.seek(max(start, os.path.getsize(path) - limit))
        return f.read().decode("utf-8", errors="replace")


def log_lines(text: str, n: int = 40) -> list[str]:
    """The last n lines as a terminal would show them: a '\\r' progress update replaces its line."""
    lines = [seg.rsplit("\r", 1)[-1] if seg.rstrip("\r") else "" for seg in text.split("\n")]
    lines = [ln.rstrip() for ln in lines]
    while lines and not lines[-1]:
        lines.pop()
    return lines[-n:]


def progress(text: str) -> dict[str, Any] | None:
    """Step, total, steps/s and ETA from the last progress-bar update in the log, or None."""
    matches = list(_BAR.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    rate = None
    if m.group(5) != "?":
        value = float(m.group(5))
        rate = value if m.group(6) == "step/s" else (1.0 / value if value else None)
    return {"step": int(m.group(1)), "total": int(m.group(2)), "elapsed": m.group(3),
            "eta": m.group(4), "steps_per_s": rate}
