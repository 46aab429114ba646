"""Aspect-ratio buckets: a set of (height, width) sizes of about resolution^2 pixels.

Every side is a multiple of 64 (the VAE downsamples by 8 and the U-Net by another 8 at its deepest),
no bucket exceeds the pixel budget, and each image goes to the bucket nearest its aspect ratio measured
in log space, so 2:1 and 1:2 are equally far from square.
"""

from __future__ import annotations

import math
from collections import Counter

STEP = 64


def make_buckets(resolution: int, min_side: int, max_side: int, max_aspect: float) -> list[tuple[int, int]]:
    """All (h, w) with sides in [min_side, max_side] (multiples of 64), area <= resolution^2 and
    long/short <= max_aspect; for each width only the tallest height that fits the budget."""
    area = resolution * resolution
    sizes = {(resolution, resolution)}
    for w in range(min_side, max_side + 1, STEP):
        h = min(max_side, area // w // STEP * STEP)
        if h < min_side:
            continue
        if max(h, w) / min(h, w) <= max_aspect:
            sizes.add((h, w))
            sizes.add((w, h))
    return sorted(s for s in sizes if s[0] * s[1] <= area and min_side <= min(s) and max(s) <= max_side)


def square_bucket(resolution: int) -> list[tuple[int, int]]:
    return [(resolution, resolution)]


def nearest(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket nearest the image's log-aspect; ties go to the larger bucket (less upscaling)."""
    h, w = size
    target = math.log(w / h)
    return min(buckets, key=lambda b: (abs(math.log(b[1] / b[0]) - target), -b[0] * b[1]))


def assign(sizes: list[tuple[int, int]], buckets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """One bucket per image size, memoised: photo sets repeat a handful of sizes."""
    memo: dict[tuple[int, int], tuple[int, int]] = {}
    for s in sizes:
        if s not in memo:
            memo[s] = nearest(s, buckets)
    return [memo[s] for s in sizes]


def describe(counts: Counter) -> str:
    """'512x512: 10, 448x576: 3' (width x height, most used first), as users name image sizes; clips add their
    frame count ('480x832x81')."""
    def name(b) -> str:
        return "x".join(str(v) for v in (b[1], b[0], *b[2:]))

    return ", ".join(f"{name(b)}: {n}" for b, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def buckets_for(data) -> list[tuple[int, int]]:
    """The bucket list a `data:` section asks for (square `resolution` when bucketing is off)."""
    if not data.buckets.enabled:
        return square_bucket(data.resolution)
    lo, hi = data.buckets.sides(data.resolution)
    return make_buckets(data.resolution, lo, hi, data.buckets.max_aspect)


def reference_bucket(bucket: tuple[int, int], resolution: int, own: int) -> tuple[int, int]:
    """A reference image's bucket (data.conditioning.role: reference): the target bucket's aspect ratio at the
    references' own pixel budget `own` (of `resolution`), each side a multiple of 16 (the VAE's 8 x 2x2 packing),
    so a batch's references stack whatever their own shapes."""
    scale = own / resolution
    return tuple(max(16, round(side * scale / 16) * 16) for side in bucket)
