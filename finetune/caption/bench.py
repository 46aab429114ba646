"""Captions per second of a captioner on this machine: tiny models, or random models of a real model's shape.

With random weights a model never says "done", so every caption runs to exactly `tokens` new tokens (a
typical caption length) with the beam count the real checkpoint uses: the time is the real model's, the
words are noise. Images are random 768x768 photos-sized arrays; the processor resizes them as it would.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


@dataclass
class BenchResult:
    name: str
    device: str
    dtype: str
    threads: int
    batch: int
    beams: int
    tokens: int
    images: int
    seconds: float
    params_m: float

    @property
    def captions_per_s(self) -> float:
        return self.images / self.seconds

    def row(self) -> str:
        return (f"| {self.name} | {self.params_m:.1f} M | {self.device} {self.dtype} | {self.threads} | {self.batch} "
                f"| {self.beams} | {self.tokens} | {self.images} | {self.seconds:.1f} | {self.captions_per_s:.3f} |")


HEADER = ("| model | params | device | threads | batch | beams | new tokens | captions | s | captions/s |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def images(n: int, size: int = 768, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)) for _ in range(n)]


def time_captioner(captioner, name: str, n: int, batch: int, tokens: int, beams: int, warmup: int = 1) -> BenchResult:
    """Caption n images in batches after `warmup` batch(es); every caption exactly `tokens` tokens long."""
    import torch

    gen = captioner.model.generation_config
    gen.update(num_beams=beams, min_new_tokens=tokens, no_repeat_ngram_size=0)
    pics = images(n + warmup * batch)
    style = "short"
    for i in range(warmup):
        captioner.caption(pics[i * batch : (i + 1) * batch], style, max_new_tokens=tokens)
    pics = pics[warmup * batch :]
    start = time.perf_counter()
    for i in range(0, n, batch):
        captioner.caption(pics[i : i + batch], style, max_new_tokens=tokens)
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in captioner.model.parameters()) / 1e6
    return BenchResult(name, captioner.device, str(captioner.dtype).replace("torch.", ""), torch.get_num_threads(),
                       batch, beams, tokens, n, seconds, params)


def florence2_base_captioner(device: str = "cpu", dtype: str = "auto"):
    """A Captioner around the random Florence-2-base-shaped model (see build.florence2_base_shape)."""
    from finetune.caption.build import florence2_base_shape
    from finetune.caption.models import Captioner, TaskPrompts, pick_device, pick_dtype

    model, processor = florence2_base_shape()
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    model.to(dev, dt).eval()
    return Captioner("Florence-2-base shape (random)", model, processor, TaskPrompts(), dev, dt)
