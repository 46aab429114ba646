"""Measure toy images: the object's colour, its shape, and how close it is to a held-out subject.

The world draws saturated objects on neutral backgrounds, so the object is the saturated pixels.
Colour is the pixel-majority nearest hue. Shape is classified against drawn templates with two
explicit features, a scale-free silhouette and a radial signature (distance from the centroid to
the edge by angle): silhouette overlap alone barely separates a heart from a circle, while the
heart's notch and point stand out in the signature. Colour and shape are reported apart, so a
right colour cannot hide a wrong shape.

numpy + PIL only; accepts PIL images or uint8 HxWx3 arrays.
"""

from __future__ import annotations

import functools
import re
from collections import Counter

import numpy as np
from PIL import Image

from finetune.toy import world

TEMPLATE_SHAPES = [*world.SHAPES, "heart"]  # every shape the scorer knows, held-out ones included
PALETTE = {**world.COLOURS, **world.SUBJECT_COLOURS}
_SIL = 24  # silhouette side after cropping to the object's box
_ANGLES = 32  # radial signature bins
_MIN_PIXELS = 12  # fewer saturated pixels than this is "no object"


def _rgb(img) -> np.ndarray:
    if isinstance(img, Image.Image):
        img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.float32)
    if arr.shape[:2] != (world.SIZE, world.SIZE):
        arr = np.asarray(
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).resize((world.SIZE, world.SIZE)),
            dtype=np.float32,
        )
    return arr


def _hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees of (..., 3) RGB values."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.degrees(np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)) % 360


_PALETTE_HUES = {name: float(_hue(np.array(c, dtype=np.float32))) for name, c in PALETTE.items()}


def foreground(img) -> np.ndarray:
    """Soft object mask in [0, 1]: saturation (max - min channel) ramps from background to object."""
    rgb = _rgb(img)
    sat = rgb.max(-1) - rgb.min(-1)
    return np.clip((sat - 40.0) / 60.0, 0.0, 1.0)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the biggest 4-connected blob, so stray saturated specks do not move the box or centroid."""
    on = mask > 0.5
    label = np.zeros(on.shape, dtype=np.int32)
    best, best_size, cur = 0, 0, 0
    h, w = on.shape
    for y0, x0 in zip(*np.nonzero(on), strict=True):
        if label[y0, x0]:
            continue
        cur += 1
        stack, size = [(y0, x0)], 0
        label[y0, x0] = cur
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and on[ny, nx] and not label[ny, nx]:
                    label[ny, nx] = cur
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = cur, size
    return np.where(label == best, mask, 0.0) if best else np.zeros_like(mask)


def colour_histogram(img, names=None) -> dict[str, float]:
    """Share of the object's pixels nearest (by hue) to each named colour."""
    names = list(names or PALETTE)
    rgb, mask = _rgb(img), foreground(img)
    pix = mask > 0.5
    if pix.sum() < _MIN_PIXELS:
        return {n: 0.0 for n in names}
    hues = _hue(rgb[pix])
    ref = np.array([_PALETTE_HUES[n] for n in names])
    diff = np.abs((hues[:, None] - ref[None, :] + 180) % 360 - 180)
    counts = np.bincount(diff.argmin(1), minlength=len(names)) / len(hues)
    return dict(zip(names, counts.tolist(), strict=True))


def colour_of(img, names=None) -> str:
    """The object's dominant colour among `names` (default: the world colours), or 'none'."""
    hist = colour_histogram(img, names or world.COLOURS)
    best = max(hist, key=hist.get)
    return best if hist[best] > 0 else "none"


def _max3(m: np.ndarray) -> np.ndarray:
    out = m.copy()
    for axis in (0, 1):
        out = np.maximum(out, np.maximum(np.roll(out, 1, axis), np.roll(out, -1, axis)))
    return out


def object_mask(img) -> np.ndarray:
    """The main object's soft mask, closed (dilate, erode) first: where two pattern colours blend
    (blue + yellow -> grey) the edge pixels are unsaturated and would split the object in pieces."""
    m = foreground(img)
    closed = -_max3(-_max3(m))
    return np.maximum(m, np.where(_largest_component(closed) > 0, closed, 0.0)) * (
        _largest_component(closed) > 0
    )


def shape_features(img) -> tuple[np.ndarray, np.ndarray] | None:
    """(silhouette, radial signature) of the object, both scale- and position-free; None if no object."""
    mask = object_mask(img)
    ys, xs = np.nonzero(mask > 0.5)
    if len(ys) < _MIN_PIXELS:
        return None
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = Image.fromarray((mask[y0:y1, x0:x1] * 255).astype(np.uint8))
    sil = np.asarray(crop.resize((_SIL, _SIL), Image.BILINEAR), dtype=np.float32) / 255.0
    w = mask[ys, xs]
    cy, cx = (ys * w).sum() / w.sum(), (xs * w).sum() / w.sum()
    ang = np.arctan2(ys - cy, xs - cx)
    rad = np.hypot(ys - cy, xs - cx) + 0.5
    bins = ((ang + np.pi) / (2 * np.pi) * _ANGLES).astype(int) % _ANGLES
    sig = np.zeros(_ANGLES, dtype=np.float32)
    np.maximum.at(sig, bins, rad)
    return sil, sig / max(sig.max(), 1e-6)


@functools.lru_cache(maxsize=1)
def _templates() -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Features of each known shape drawn at several sizes and positions (built once, ~0.2 s)."""
    out = {}
    for shape in TEMPLATE_SHAPES:
        feats = []
        for i, r in enumerate(np.linspace(10, 24, 8)):
            cx, cy = 32 + (i % 3 - 1) * 3.3, 32 + (i % 2) * 2.7
            feats.append(shape_features(world.draw(shape, "red", "white", cx, cy, float(r))))
        out[shape] = feats
    return out


def shape_distances(img) -> dict[str, float] | None:
    """Distance from the object to the nearest template of each shape (silhouette + signature)."""
    feats = shape_features(img)
    if feats is None:
        return None
    sil, sig = feats
    return {
        shape: min(float(np.mean((sil - ts) ** 2) + 2.0 * np.mean((sig - tg) ** 2)) for ts, tg in temps)
        for shape, temps in _templates().items()
    }


def shape_of(img, names=None) -> str:
    """The object's shape among `names` (default: the world shapes plus 'heart'), or 'none'."""
    dist = shape_distances(img)
    if dist is None:
        return "none"
    names = list(names or TEMPLATE_SHAPES)
    return min(names, key=dist.get)


def _transitions(img, names) -> tuple[float, float]:
    """Mean number of colour changes met crossing the object along a row and along a column: 0 for
    a solid object, about 3 across four stripes or checks, whatever the object's size. Unsaturated
    pixels (where blue and yellow blend to grey) are skipped rather than counted as a change."""
    rgb = _rgb(img)
    mask = (object_mask(img) > 0.5) & (foreground(img) > 0.5)
    ref = np.array([_PALETTE_HUES[n] for n in names])
    lab = np.abs((_hue(rgb)[..., None] - ref + 180) % 360 - 180).argmin(-1)
    rates = []
    for lab_t, mask_t in ((lab, mask), (lab.T, mask.T)):  # rows (changes along x), then columns
        changes = [
            np.count_nonzero(np.diff(line[m]) != 0)
            for line, m in zip(lab_t, mask_t, strict=True)
            if m.sum() > 1
        ]
        rates.append(float(np.mean(changes)) if changes else 0.0)
    return rates[0], rates[1]


@functools.lru_cache(maxsize=8)
def _subject_reference(name: str) -> tuple[dict[str, float], tuple[float, float]]:
    """Mean colour histogram and pattern transition rates of a subject's drawn instance images."""
    imgs = [img for img, _ in world.subject_images(name, 16, seed=12345)]
    hists = [colour_histogram(i) for i in imgs]
    hist = {k: float(np.mean([h[k] for h in hists])) for k in PALETTE}
    trans = np.mean([_transitions(i, list(PALETTE)) for i in imgs], axis=0)
    return hist, (float(trans[0]), float(trans[1]))


def subject_parts(img, subject_name: str) -> dict[str, float]:
    """Shape, colour and pattern agreement with a held-out subject, each in [0, 1]."""
    subj = world.get_subject(subject_name)
    ref_hist, (ex, ey) = _subject_reference(subj.name)
    dist = shape_distances(img)
    if dist is None:
        return {"shape": 0.0, "colour": 0.0, "pattern": 0.0}
    mine = dist[subj.shape]
    other = min(d for s, d in dist.items() if s != subj.shape)
    shape = other / (mine + other + 1e-9)  # 1 = exactly the subject's shape, 0.5 = can't tell
    hist = colour_histogram(img)
    colour = sum(min(hist[k], ref_hist[k]) for k in PALETTE)  # histogram intersection
    tx, ty = _transitions(img, list(PALETTE))
    pattern = float(np.exp(-(abs(tx - ex) + abs(ty - ey)) / 1.5))  # 1.5 changes off ~ e^-1
    return {"shape": float(shape), "colour": float(colour), "pattern": pattern}


def subject_similarity(img, subject_name: str) -> float:
    """How close an image is to a held-out subject, in [0, 1]: the product of shape, colour and
    pattern agreement, so a red circle is far from a red heart and a blue star far from a striped one."""
    parts = subject_parts(img, subject_name)
    return float(parts["shape"] * parts["colour"] * parts["pattern"])


def prompt_targets(prompt: str) -> tuple[str | None, str | None]:
    """The colour and shape words a prompt asks for (None where it names none)."""
    words = re.findall(r"[a-z]+", prompt.lower())
    colour = next((w for w in words if w in world.COLOURS), None)
    shape = next((w for w in words if w in TEMPLATE_SHAPES), None)
    return colour, shape


def score_images(images, prompts=None, subject=None) -> dict:
    """Summary numbers for a batch of generated toy images.

    Always: the colour and shape found in each image and their counts. With `prompts` (one per
    image): colour_acc / shape_acc / both_acc over the images whose prompt names a colour / shape.
    With `subject`: mean subject similarity and its shape / colour / pattern parts.
    """
    colours = [colour_of(i) for i in images]
    shapes = [shape_of(i) for i in images]
    out: dict = {
        "n": len(images),
        "colours": colours,
        "shapes": shapes,
        "colour_counts": dict(Counter(colours)),
        "shape_counts": dict(Counter(shapes)),
    }
    if prompts is not None:
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        targets = [prompt_targets(p) for p in prompts]
        col_ok = [c == t[0] for c, t in zip(colours, targets, strict=True) if t[0]]
        shp_ok = [s == t[1] for s, t in zip(shapes, targets, strict=True) if t[1]]
        both = [
            c == t[0] and s == t[1] for c, s, t in zip(colours, shapes, targets, strict=True) if t[0] and t[1]
        ]
        out.update(colour_acc=_mean(col_ok), shape_acc=_mean(shp_ok), both_acc=_mean(both))
    if subject is not None:
        parts = [subject_parts(i, subject) for i in images]
        sims = [p["shape"] * p["colour"] * p["pattern"] for p in parts]
        out.update(
            subject=subject,
            subject_similarity=_mean(sims),
            subject_similarities=sims,
            **{f"subject_{k}": _mean([p[k] for p in parts]) for k in ("shape", "colour", "pattern")},
        )
    return out


_WORLD_WORDS = {"a", "an", "on", "background", *world.COLOURS, *world.SHAPES, *world.BACKGROUNDS}


def is_world_prompt(prompt: str) -> bool:
    """True for a prompt the base already draws (only world words: 'a blue square'); a prompt with a trigger
    or a held-out word ('a sks heart') is not one, and is scored by subject similarity instead."""
    words = re.findall(r"[a-z<>]+", prompt.lower())
    return bool(words) and all(w in _WORLD_WORDS for w in words)


def pixel_drift(img, base) -> float:
    """Mean absolute pixel difference to the base's sample with the same seed, in [0, 1] (0: identical)."""
    return float(np.abs(_rgb(img) - _rgb(base)).mean() / 255.0)


def drift_scores(rows, base_rows, prompts) -> dict[str, float]:
    """For every world prompt: colour and shape accuracy against the prompt's words, and the mean pixel drift
    from the base's samples (same seeds; skipped when `base_rows` is None). Flat keys '<prompt> | <measure>'."""
    out: dict[str, float] = {}
    for i, prompt in enumerate(prompts):
        if not is_world_prompt(prompt):
            continue
        acc = score_images(rows[i], [prompt] * len(rows[i]))
        for key, name in (("colour_acc", "colour"), ("shape_acc", "shape")):
            if acc[key] is not None:
                out[f"{prompt} | {name}"] = acc[key]
        if base_rows is not None:
            out[f"{prompt} | drift"] = float(np.mean([pixel_drift(a, b) for a, b in
                                                      zip(rows[i], base_rows[i], strict=True)]))
    return out


def _mean(xs) -> float | None:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else None
