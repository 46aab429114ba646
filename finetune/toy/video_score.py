"""Scoring toy video clips: what shape, what colour, and which way it moves.

The shape is found in every frame as the image scorer finds it (finetune/toy/score.py: saturated pixels,
largest blob); its centroid and area are tracked across the frames. Motion is read from the track:

- the move: the centroid's displacement from the first to the last frame; a move counts when it covers at
  least `MIN_MOVE` px (the world's moves cover 20) and its main axis gives left / right / up / down;
- growing / shrinking: the area's ratio from the first to the last frame beyond `MIN_GROWTH` (the world's
  growth is (15 / 7)^2 ~ 4.6x) while the centroid stays within `MIN_MOVE`;
- otherwise 'still'.

Colour and shape are read on the middle frame (colour: the hue nearest a world colour; shape: the
silhouette template nearest). numpy + PIL only.
"""

from __future__ import annotations

import numpy as np

from finetune.toy import score
from finetune.toy.video_world import DIRECTIONS

MIN_MOVE = 8.0  # px of centroid travel that counts as a move
MIN_GROWTH = 1.8  # area ratio that counts as growing (its inverse: shrinking)
MOTION_WORDS = [*(f"moving {d}" for d in DIRECTIONS), "growing", "shrinking"]


def track(frames) -> list[tuple[float, float, float] | None]:
    """(x, y, area) of the object in each frame (None where no object is found)."""
    out = []
    for frame in frames:
        mask = score.object_mask(frame)
        area = float(mask.sum())
        if area < 12:
            out.append(None)
            continue
        ys, xs = np.mgrid[: mask.shape[0], : mask.shape[1]]
        out.append((float((xs * mask).sum() / area), float((ys * mask).sum() / area), area))
    return out


def motion_of(frames) -> str:
    """'moving left' / 'moving right' / 'moving up' / 'moving down' / 'growing' / 'shrinking' / 'still' /
    'none' (no object in the first or last frame)."""
    points = track(frames)
    first, last = points[0], points[-1]
    if first is None or last is None:
        return "none"
    dx, dy = last[0] - first[0], last[1] - first[1]
    if max(abs(dx), abs(dy)) >= MIN_MOVE:
        if abs(dx) >= abs(dy):
            return "moving right" if dx > 0 else "moving left"
        return "moving down" if dy > 0 else "moving up"
    ratio = last[2] / first[2]
    if ratio >= MIN_GROWTH:
        return "growing"
    if ratio <= 1 / MIN_GROWTH:
        return "shrinking"
    return "still"


def smoothness(frames) -> float:
    """Temporal consistency of the track in [0, 1]: 1 - (mean deviation of the per-frame steps from their mean
    step) / (mean step length + 1 px). A shape gliding at constant speed scores ~1, one that jumps about
    scores low. (The image-level temporal-consistency metric is in finetune/eval/video.py.)"""
    points = [p for p in track(frames) if p is not None]
    if len(points) < 3:
        return 0.0
    xy = np.array([(x, y) for x, y, _ in points])
    steps = np.diff(xy, axis=0)
    mean = steps.mean(axis=0)
    spread = float(np.linalg.norm(steps - mean, axis=1).mean())
    return float(max(0.0, 1.0 - spread / (np.linalg.norm(mean) + 1.0)))


def prompt_targets(prompt: str) -> tuple[str | None, str | None, str | None]:
    """The colour, shape and motion words a prompt asks for (None where it names none)."""
    colour, shape = score.prompt_targets(prompt)
    motion = next((m for m in MOTION_WORDS if m in prompt), None)
    return colour, shape, motion


def score_clip(frames, prompt: str) -> dict[str, object]:
    """What the clip shows and whether each part matches the prompt."""
    middle = frames[len(frames) // 2]
    got = {"colour": score.colour_of(middle), "shape": score.shape_of(middle), "motion": motion_of(frames)}
    want = dict(zip(("colour", "shape", "motion"), prompt_targets(prompt), strict=True))
    ok = {k: got[k] == want[k] for k in got if want[k] is not None}
    return {**got, **{f"{k}_ok": v for k, v in ok.items()}, "all_ok": all(ok.values()),
            "smoothness": smoothness(frames)}
