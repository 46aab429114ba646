"""The toy video world: the toy shapes (finetune/toy/world.py) moving, in short captioned clips.

A clip is `FRAMES` frames of 64 px: one shape in one colour on a plain background, doing one thing over the
clip: moving left / right / up / down (`STEP` px a frame), growing, or changing colour, captioned like
"a red circle moving left", "a blue star growing", "a green square turning purple". Everything is drawn with
PIL from a seed, so the same call always returns the same clips.

The base is pretrained on `world_clips` only. `HELD_OUT` motions never appear there: a LoRA test teaches one
("shrinking") and checks that it was learned rather than remembered, as the image toy does with the red heart.

numpy + PIL only (no torch): data tools and tests import it.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

from finetune.toy.world import COLOURS, SHAPES, SIZE, draw

FRAMES = 9  # 4k + 1: the Wan VAE's causal 4x time compression gives 3 latent frames
STEP = 2.5  # px a frame for the moves: 20 px over a clip, a third of the frame
BACKGROUNDS = ["white", "gray", "black"]  # plain: the scorer finds the shape as the saturated pixels
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
MOTIONS = [f"moving {d}" for d in DIRECTIONS] + ["growing", "changing colour"]
HELD_OUT = ["shrinking"]  # never in base pretraining
GROW = (7.0, 15.0)  # radius at the first and last frame of "growing" ("shrinking": the other way round)
R_MOVE = (8.0, 13.0)  # radius range of a moving shape


def _positions(motion: str, rng: random.Random) -> tuple[list[tuple[float, float]], list[float]]:
    """Centre and radius of the shape in every frame."""
    n = FRAMES - 1
    if motion in ("growing", "shrinking"):
        lo, hi = GROW if motion == "growing" else GROW[::-1]
        m = max(GROW) + 2
        cx, cy = rng.uniform(m, SIZE - m), rng.uniform(m, SIZE - m)
        return [(cx, cy)] * FRAMES, [lo + (hi - lo) * i / n for i in range(FRAMES)]
    r = rng.uniform(*R_MOVE)
    dx, dy = DIRECTIONS.get(motion.removeprefix("moving "), (0, 0))
    travel = STEP * n
    m = r + 2

    def start(d: int) -> float:  # keep the whole path inside the frame
        if d < 0:
            return rng.uniform(m + travel, SIZE - m)
        if d > 0:
            return rng.uniform(m, SIZE - m - travel)
        return rng.uniform(m, SIZE - m)

    x0, y0 = start(dx), start(dy)
    return [(x0 + dx * STEP * i, y0 + dy * STEP * i) for i in range(FRAMES)], [r] * FRAMES


def _mix(a: str, b: str, w: float) -> tuple[int, int, int]:
    return tuple(round((1 - w) * x + w * y) for x, y in zip(COLOURS[a], COLOURS[b], strict=True))


def draw_clip(shape: str, colour: str, motion: str, background: str, rng: random.Random,
              to_colour: str | None = None) -> list[Image.Image]:
    """One clip: `FRAMES` RGB frames of the shape doing `motion` ('changing colour' fades to `to_colour`)."""
    centres, radii = _positions(motion, rng)
    seed = rng.randrange(1 << 30)
    frames = []
    for i, ((cx, cy), r) in enumerate(zip(centres, radii, strict=True)):
        paint = _mix(colour, to_colour, i / (FRAMES - 1)) if to_colour else COLOURS[colour]
        frames.append(draw(shape, [paint], background, cx, cy, r, seed=seed))
    return frames


def caption(colour: str, shape: str, motion: str, to_colour: str | None = None) -> str:
    if motion == "changing colour":
        return f"a {colour} {shape} turning {to_colour}"
    return f"a {colour} {shape} {motion}"


def world_clip(rng: random.Random, motions=tuple(MOTIONS)) -> tuple[list[Image.Image], str]:
    colour, shape, motion = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(motions))
    background = rng.choice(BACKGROUNDS)
    to_colour = rng.choice([c for c in COLOURS if c != colour]) if motion == "changing colour" else None
    return draw_clip(shape, colour, motion, background, rng, to_colour), caption(colour, shape, motion, to_colour)


def world_clips(n: int, seed: int = 0) -> list[tuple[list[Image.Image], str]]:
    """`n` captioned clips of the world (never a held-out motion), the same for the same seed."""
    rng = random.Random(f"video:{seed}")
    return [world_clip(rng) for _ in range(n)]


def motion_clips(motion: str, n: int, seed: int = 0, colours=None, shapes=None) -> list[tuple[list[Image.Image], str]]:
    """`n` clips of one motion (a held-out one for a LoRA), captioned like 'a red circle shrinking'."""
    if motion not in MOTIONS + HELD_OUT:
        from finetune.errors import DataError, did_you_mean

        raise DataError(f"unknown toy motion '{motion}'{did_you_mean(motion, MOTIONS + HELD_OUT)}; choose one "
                        f"of: {', '.join(MOTIONS + HELD_OUT)}")
    rng = random.Random(f"motion:{motion}:{seed}")
    out = []
    for _ in range(n):
        colour, shape = rng.choice(list(colours or COLOURS)), rng.choice(list(shapes or SHAPES))
        to_colour = rng.choice([c for c in COLOURS if c != colour]) if motion == "changing colour" else None
        frames = draw_clip(shape, colour, motion, rng.choice(BACKGROUNDS), rng, to_colour)
        out.append((frames, caption(colour, shape, motion, to_colour)))
    return out


def to_array(frames: list[Image.Image]) -> np.ndarray:
    """uint8 (F, H, W, 3) of one clip."""
    return np.stack([np.asarray(f.convert("RGB"), dtype=np.uint8) for f in frames])
