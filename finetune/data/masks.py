"""Loss masks (data.masks): where in an image the loss counts.

An image's mask is a same-stem greyscale file in the mask folder (default `masks/` beside the image: white =
learn here, black = ignore), or else its alpha channel. The mask goes through the same resize, crop and flip
as its image, then is reduced to the latent grid (`to_latent`, a cell counts as much as its least-wanted
pixel), where the loss is weighted. The latent
cache stores it beside the latents, at latent resolution.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from finetune.data.images import IMAGE_EXTS, Cover, crop_flip
from finetune.errors import DataError


def mask_file(record, cfg) -> Path | None:
    """The record's mask file, if it has one (records read from files only)."""
    if record.path is None:
        return None
    image = Path(record.path)
    folder = Path(cfg.folder).expanduser()
    folder = folder if folder.is_absolute() else image.parent / folder
    for ext in sorted(IMAGE_EXTS):
        candidate = folder / f"{image.stem}{ext}"
        if candidate.is_file():
            return candidate
    return None


def _alpha(data: bytes) -> Image.Image | None:
    img = Image.open(io.BytesIO(data))
    if not ("A" in img.getbands() or "transparency" in img.info):
        return None
    return ImageOps.exif_transpose(img).convert("RGBA").getchannel("A")


def read_mask(record, cfg) -> Image.Image | None:
    """The record's mask as an upright 8-bit greyscale image, or None when it has none."""
    if record.mask is not None:
        return Image.open(io.BytesIO(record.mask)).convert("L")
    path = mask_file(record, cfg)
    try:
        if path is not None:
            mask = ImageOps.exif_transpose(Image.open(path)).convert("L")
        else:
            mask = _alpha(record.read()) if cfg.alpha else None
    except OSError as e:
        raise DataError(f"{path or record.key}: the mask cannot be read ({e}); fix or remove it") from None
    if mask is None and cfg.required:
        raise DataError(f"{record.key}: no mask (no file in '{cfg.folder}' and no alpha channel) and "
                        "data.masks.required is true; add its mask or set required: false")
    return mask


def mask_digest(record, cfg) -> str:
    """What a cache key needs to miss when a mask changes: its file's bytes, or the image's (alpha)."""
    if record.mask is not None:
        return hashlib.blake2b(record.mask, digest_size=16).hexdigest()
    path = mask_file(record, cfg)
    if path is None:
        return f"alpha:{cfg.alpha}"
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()


def mask_pixels(record, cfg, c: Cover, bucket: tuple[int, int], flip: bool) -> np.ndarray:
    """[H, W] float32 in [0, 1] for the bucket, transformed like the image (ones when there is no mask)."""
    mask = read_mask(record, cfg)
    if mask is None:
        return np.ones(bucket, dtype=np.float32)
    if mask.size != (record.size[1], record.size[0]):
        raise DataError(f"{record.key}: its mask is {mask.size[0]}x{mask.size[1]} but the image is "
                        f"{record.size[1]}x{record.size[0]}; make the mask the image's size")
    arr = np.asarray(mask.resize((c.rw, c.rh), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    out, _ = crop_flip(arr, c, bucket, flip)
    return np.ascontiguousarray(out)


def to_latent(mask, size):
    """[B, 1, H, W] pixel mask -> the latent grid `size`: each latent cell takes the smallest weight among its
    pixels. A latent cell encodes all of its pixels, so one that straddles the edge would teach the masked-out
    part too (an area average leaked the training background into the subject in the toy test).
    A mask already at that size is returned as it is."""
    import torch.nn.functional as F

    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return -F.adaptive_max_pool2d(-mask.float(), tuple(size))


def weighted(mask, unmasked_weight: float):
    """Mask in [0, 1] -> loss weights: 1 inside, `unmasked_weight` outside."""
    return unmasked_weight + (1.0 - unmasked_weight) * mask
