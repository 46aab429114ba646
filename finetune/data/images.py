"""Decoding and geometry of one image, with PIL and numpy only (no torch: `--check` uses this).

An image arrives as encoded bytes (a file's contents, an HF dataset cell, a toy PNG). We decode it once,
honour EXIF orientation, turn every mode into 8-bit RGB, resize it to cover its bucket and crop.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
_ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_WHITE = (255, 255, 255)


class BadImage(Exception):
    """The bytes are not a usable image; the message says why (the caller adds the file name)."""


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise BadImage("not an image PIL can read (wrong extension or corrupt header)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(f"cannot be opened ({e})") from None


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    """(h, w) after EXIF orientation, read from the header without decoding pixels."""
    w, h = img.size
    if img.getexif().get(0x0112) in _ROTATED:
        w, h = h, w
    return h, w


def probe(data: bytes) -> tuple[int, int]:
    """Check that the bytes decode fully and return the (h, w) after EXIF orientation.

    Truncated files only fail while decoding, so we decode; for JPEG at 1/8 scale through `draft`,
    which still reads every entropy-coded byte but costs a fraction of a full decode.
    """
    img = _open(data)
    try:
        size = _oriented_size(img)  # PNG reads its metadata chunks here, so truncation can show up already
        img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
        img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImage(f"is corrupt or truncated ({e})") from None
    if min(size) < 1:
        raise BadImage("has no pixels")
    return size


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparency is composited on white (a black fill would teach
    the model black backgrounds), 16/32-bit greyscale is scaled down to 8 bits instead of clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" or img.mode == "LA" or img.mode == "PA" or "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        back = Image.new("RGB", img.size, _WHITE)
        back.paste(img, mask=img.getchannel("A"))
        return back
    return img.convert("RGB") if img.mode != "RGB" else img


def decode(data: bytes, need: tuple[int, int] | None = None) -> Image.Image:
    """Decode to an upright RGB image. `need` = (h, w) the result must still cover: JPEGs are then
    decoded at the smallest power-of-two reduction that does, which is much faster for large photos."""
    img = _open(data)
    try:
        if need is not None:
            h, w = need
            oh, ow = _oriented_size(img)
            scale = max(h / oh, w / ow)
            want = (math.ceil(img.width * scale), math.ceil(img.height * scale))
            img.draft("RGB", want)
        img.load()
        img = ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImage(f"is corrupt or truncated ({e})") from None
    return to_rgb(img)


@dataclass(frozen=True)
class Cover:
    """How an image of original size (h, w) becomes a bucket (H, W): resize to (rh, rw), crop at (top, left)."""

    rh: int
    rw: int
    top: int
    left: int


def cover(size: tuple[int, int], bucket: tuple[int, int], crop: str = "center", seed: int = 0) -> Cover:
    """Resize-to-cover then crop: the smallest resize that fills the bucket, no padding or stretching."""
    h, w = size
    bh, bw = bucket[:2]  # a clip's bucket adds its frame count
    scale = max(bh / h, bw / w)
    rh, rw = max(bh, round(h * scale)), max(bw, round(w * scale))
    if crop == "random":
        rng = random.Random(seed)
        top, left = rng.randint(0, rh - bh), rng.randint(0, rw - bw)
    else:
        top, left = (rh - bh) // 2, (rw - bw) // 2
    return Cover(rh, rw, top, left)


def resize(img: Image.Image, rh: int, rw: int) -> np.ndarray:
    """RGB image -> uint8 array [rh, rw, 3]. LANCZOS with a reducing gap: good quality, fast downscales."""
    if img.size != (rw, rh):
        img = img.resize((rw, rh), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(img, dtype=np.uint8)


def crop_flip(arr: np.ndarray, c: Cover, bucket: tuple[int, int], flip: bool) -> tuple[np.ndarray, int]:
    """Cut the bucket out of a resized array; returns the crop and the left offset as SDXL sees it
    (measured on the flipped image when flipped, so the conditioning matches the pixels)."""
    bh, bw = bucket[:2]
    lead = (slice(None),) if arr.ndim == 4 else ()  # a clip's frames [F, H, W, 3]; else [H, W, 3] or a mask [H, W]
    out = arr[(*lead, slice(c.top, c.top + bh), slice(c.left, c.left + bw))]
    if not flip:
        return out, c.left
    return out[(*lead, slice(None), slice(None, None, -1))], c.rw - c.left - bw
