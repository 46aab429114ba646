"""Computed control images (data.control): each target's control map made from the target itself, as PNG bytes
that then travel like a paired control/ image (resized, cropped and flipped with the target, in the latent cache).

- 'canny': OpenCV's Canny edges of the grey target (what diffusers' ControlNet and Control LoRA examples train
  on: white edges on black, three channels);
- 'toy_mask': the toy world's object mask, the same foreground the toy scorer measures (finetune/toy/score.py).

Made at the original size, before any resize: the control image is what a user would have put in control/.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from finetune.data.records import Problems, Record, blob_condition


def canny(img: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    import cv2

    edges = cv2.Canny(np.asarray(img.convert("L")), low, high)
    return Image.fromarray(edges).convert("RGB")


def toy_mask(img: Image.Image) -> Image.Image:
    from finetune.toy.score import foreground

    mask = (foreground(img.convert("RGB")) > 0.1).astype(np.uint8) * 255
    return Image.fromarray(mask).convert("RGB")


COMPUTE = {"canny": lambda img, cfg: canny(img, cfg.low, cfg.high), "toy_mask": lambda img, cfg: toy_mask(img)}


def control_image(img: Image.Image, cfg) -> Image.Image:
    """The control image data.control makes of a picture (a target, or a validation pair's image)."""
    return COMPUTE[cfg.compute](img, cfg)


def control_png(data: bytes, cfg) -> bytes:
    """The control image of an encoded target, PNG-encoded."""
    from finetune.data.images import decode

    buf = io.BytesIO()
    control_image(decode(data), cfg).save(buf, format="PNG")
    return buf.getvalue()


def with_controls(records: list[Record], cfg, probs: Problems) -> list[Record]:
    """Each record with its computed control image as its one (spatial) conditioning image; a target that cannot
    be read is reported like a bad pair and left out."""
    from dataclasses import replace

    out = []
    for rec in records:
        cond = blob_condition(f"{rec.key}/{cfg.compute}", control_png(rec.read(), cfg), "spatial", probs, rec.key)
        if cond is not None:
            out.append(replace(rec, conditions=(cond,)))
    return out
