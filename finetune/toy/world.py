"""The toy world: captioned 64 px images of coloured shapes, plus held-out subjects to personalise on.

Everything is drawn with PIL from a seed, so the same call always returns the same images. The base
model is pretrained on `world_images` only; the held-out subjects (`SUBJECTS`) never appear there, so
a fine-tuning test can check that the new subject was learned rather than remembered.

numpy + PIL only: this module is imported by data tools and tests that must not pay for torch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
_SUPER = 4  # draw at 4x and downsample, so edges are anti-aliased like real images

# Hues far apart, so a small colour drift in a generated image still lands on the prompted colour.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "yellow": (240, 200, 20),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (150, 40, 190),
}
SHAPES: list[str] = ["circle", "square", "triangle", "star"]
# Neutral backgrounds only: the scorer finds the object as the saturated pixels.
BACKGROUNDS: list[str] = ["white", "black", "gray", "lined", "dotted"]
_PLAIN = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}

# Colours that only the held-out subjects use: the VAE sees them, the base U-Net never does.
SUBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "magenta": (230, 40, 200),
    "cyan": (30, 200, 220),
}


@dataclass(frozen=True)
class Subject:
    """A held-out subject: something a user would personalise on, never in base pretraining."""

    name: str
    class_word: str  # the class noun used in prompts, e.g. "heart" in "a sks heart"
    description: str  # the words in an instance caption before the class word
    shape: str
    colours: tuple[str, ...]  # one colour = solid; two = the pattern alternates between them
    pattern: str = "solid"  # "solid", "checkered" or "striped"
    backgrounds: tuple[str, ...] = field(default=("white", "gray"))

    @property
    def rgb(self) -> list[tuple[int, int, int]]:
        return [_rgb(c) for c in self.colours]


SUBJECTS: dict[str, Subject] = {
    s.name: s
    for s in [
        # New shape, known colour: the easiest; LoRA must learn a shape the base cannot draw.
        Subject("red_heart", "heart", "red", "heart", ("red",)),
        # New shape, new colours, new pattern: the most distinctive and the hardest.
        Subject("checkered_heart", "heart", "checkered", "heart", ("magenta", "cyan"), "checkered"),
        # Known shape, new pattern: the base draws stars, so only the stripes are new.
        Subject("striped_star", "star", "striped", "star", ("blue", "yellow"), "striped"),
    ]
}


def _rgb(colour: str) -> tuple[int, int, int]:
    return COLOURS.get(colour) or SUBJECT_COLOURS[colour]


def get_subject(name: str) -> Subject:
    """The held-out subject called `name`; an unknown name is a DataError with a did-you-mean."""
    if name not in SUBJECTS:
        from finetune.errors import DataError, did_you_mean

        raise DataError(
            f"unknown toy subject '{name}'{did_you_mean(name, SUBJECTS)}; choose one of: {', '.join(SUBJECTS)}"
        )
    return SUBJECTS[name]


# ---------------------------------------------------------------------------------------------- drawing
def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Outline of an upright shape of 'radius' r around (cx, cy); None for the circle (drawn as ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":
        h = r * 0.85  # a square of the same radius looks bigger than a circle; keep areas comparable
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        angles = [-90, 30, 150]
        return [(cx + r * np.cos(np.radians(a)), cy + 0.15 * r + r * np.sin(np.radians(a))) for a in angles]
    if shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.42
            a = np.radians(-90 + 36 * i)
            pts.append((cx + rad * np.cos(a), cy + 0.08 * r + rad * np.sin(a)))
        return pts
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 80, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        s = r / 16.5
        return list(zip(cx + s * x, cy + s * (y + 1.5), strict=True))
    raise ValueError(f"unknown shape {shape!r}")


def _background(name: str, rng: random.Random) -> Image.Image:
    big = SIZE * _SUPER
    if name in _PLAIN:
        return Image.new("RGB", (big, big), _PLAIN[name])
    img = Image.new("RGB", (big, big), (235, 235, 235))
    draw = ImageDraw.Draw(img)
    ink = (170, 170, 170)
    if name == "lined":  # not "striped": that word belongs to the held-out striped star
        step = rng.choice([6, 8, 10]) * _SUPER
        for y in range(rng.randrange(step), big, step):
            draw.rectangle([0, y, big, y + step // 2 - 1], fill=ink)
    elif name == "dotted":
        step = rng.choice([6, 8]) * _SUPER
        for y in range(step // 2, big, step):
            for x in range(step // 2, big, step):
                draw.ellipse(
                    [x - 1.5 * _SUPER, y - 1.5 * _SUPER, x + 1.5 * _SUPER, y + 1.5 * _SUPER], fill=ink
                )
    else:
        raise ValueError(f"unknown background {name!r}")
    return img


def _fill(
    size: int, colours: list[tuple[int, int, int]], pattern: str, box: tuple[float, ...]
) -> Image.Image:
    """The object's paint: one colour, or a pattern laid out relative to the object's box."""
    paint = Image.new("RGB", (size, size), colours[0])
    if pattern == "solid":
        return paint
    draw = ImageDraw.Draw(paint)
    x0, y0, x1, y1 = box
    n = 4  # cells / stripes across the object, so the pattern scales with it
    cw, ch = (x1 - x0) / n, (y1 - y0) / n
    for i in range(-1, n + 1):
        for j in range(-1, n + 1):
            if (pattern == "checkered" and (i + j) % 2) or (pattern == "striped" and j % 2):
                draw.rectangle(
                    [x0 + i * cw, y0 + j * ch, x0 + (i + 1) * cw, y0 + (j + 1) * ch], fill=colours[1]
                )
    return paint


def draw(
    shape: str,
    colours,
    background: str = "white",
    cx: float = 32,
    cy: float = 32,
    r: float = 18,
    pattern: str = "solid",
    seed: int = 0,
) -> Image.Image:
    """One 64x64 image: a shape in one colour (or a two-colour pattern) on a background."""
    rgb = [
        c if isinstance(c, tuple) else _rgb(c) for c in ([colours] if isinstance(colours, str) else colours)
    ]
    img = _background(background, random.Random(seed))
    big = SIZE * _SUPER
    cx, cy, r = cx * _SUPER, cy * _SUPER, r * _SUPER
    mask = Image.new("L", (big, big), 0)
    mdraw = ImageDraw.Draw(mask)
    poly = shape_polygon(shape, cx, cy, r)
    if poly is None:
        mdraw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        mdraw.polygon(poly, fill=255)
    img.paste(_fill(big, rgb, pattern, (cx - r, cy - r, cx + r, cy + r)), (0, 0), mask)
    return img.resize((SIZE, SIZE), Image.LANCZOS)


def _size_word(r: float) -> str:
    return "small" if r < 14 else "big" if r > 20 else ""


def caption_variants(colour: str, shape: str, background: str, r: float) -> list[str]:
    """Ways to say what is in an image; training samples among them so short prompts work too."""
    thing = f"{colour} {shape}"
    size = _size_word(r)
    sized = f"{size} {thing}" if size else thing
    bg = f"on a {background} background"
    return [
        f"a {thing} {bg}",
        f"a {thing}",
        f"a {sized} {bg}",
        f"{thing}",
        f"a {sized}",
        f"a {thing}, {background} background",
    ]


def _placement(rng: random.Random, rmin: float = 10, rmax: float = 24) -> tuple[float, float, float]:
    r = rng.uniform(rmin, rmax)
    margin = r + 2
    return rng.uniform(margin, SIZE - margin), rng.uniform(margin, SIZE - margin), r


def world_record(rng: random.Random) -> tuple[Image.Image, list[str]]:
    """One random world image with all its caption variants (the full caption first)."""
    colour, shape, bg = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(BACKGROUNDS)
    cx, cy, r = _placement(rng)
    img = draw(shape, colour, bg, cx, cy, r, seed=rng.randrange(1 << 30))
    return img, caption_variants(colour, shape, bg, r)


def world_records(n: int, seed: int = 0) -> list[tuple[Image.Image, list[str]]]:
    """`n` world images, each with every way to caption it; what the base U-Net trains on."""
    rng = random.Random(seed)
    return [world_record(rng) for _ in range(n)]


def world_images(n: int, seed: int = 0, variants: bool = False) -> list[tuple[Image.Image, str]]:
    """`n` captioned world samples (never a held-out subject), the same for the same seed.

    With `variants` each caption is a random variant ("a red circle", ...) instead of the full one.
    """
    pick = random.Random(f"variants:{seed}")
    return [(img, pick.choice(caps) if variants else caps[0]) for img, caps in world_records(n, seed)]


def subject_images(name: str, n: int, seed: int = 0) -> list[tuple[Image.Image, str]]:
    """Instance images of a held-out subject, captioned like 'a checkered heart on a white background'."""
    subj = get_subject(name)
    rng = random.Random(f"{name}:{seed}")
    out = []
    for _ in range(n):
        bg = rng.choice(subj.backgrounds)
        cx, cy, r = _placement(rng, 14, 24)  # a user's photos show the subject fairly large
        img = draw(subj.shape, subj.rgb, bg, cx, cy, r, subj.pattern, seed=rng.randrange(1 << 30))
        out.append((img, f"a {subj.description} {subj.class_word} on a {bg} background"))
    return out


def class_images(name: str, n: int, seed: int = 0) -> list[tuple[Image.Image, str]]:
    """Images of the subject's class word drawn the plain world way: solid, in world colours.

    For a star these are exactly what the base was trained on. Hearts are not in base pretraining, so
    for heart subjects these are drawn hearts in the other world colours: a prior for 'heart' that
    keeps the subject's look (its colours and pattern) tied to the rare token.
    """
    subj = get_subject(name)
    rng = random.Random(f"class:{name}:{seed}")
    colours = [c for c in COLOURS if c not in subj.colours or subj.pattern != "solid"]
    out = []
    for _ in range(n):
        colour, bg = rng.choice(colours), rng.choice(BACKGROUNDS)
        cx, cy, r = _placement(rng)
        img = draw(subj.shape, colour, bg, cx, cy, r, seed=rng.randrange(1 << 30))
        out.append((img, f"a {colour} {subj.class_word} on a {bg} background"))
    return out


def vae_images(n: int, seed: int = 0) -> list[Image.Image]:
    """What the VAE trains on: the world plus every held-out subject, so their colours and patterns
    stay representable in latent space (a VAE that never saw magenta cannot decode it later)."""
    rng = random.Random(f"vae:{seed}")
    images = []
    names = list(SUBJECTS)
    for i in range(n):
        if i % 4 == 3:  # a quarter subjects, with class images of every shape thrown in via the world
            images.append(subject_images(names[(i // 4) % len(names)], 1, seed=rng.randrange(1 << 30))[0][0])
        else:
            images.append(world_record(rng)[0])
    return images


def to_array(images) -> np.ndarray:
    """uint8 array (N, 64, 64, 3) from a list of PIL images."""
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
