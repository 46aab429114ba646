"""DreamBench's numbers from embeddings, and their confidence intervals. torch + numpy, no models.

- **CLIP-I** and **DINO** (subject fidelity): the cosine similarity of L2-normalised image embeddings,
  averaged over every (generated, reference) pair, as DreamBench averages. Per generated image this is
  its mean over the references, so the set's value is the mean of the per-image values.
- **CLIP-T** (prompt fidelity): the cosine similarity between a generated image's CLIP image embedding and
  the CLIP text embedding of its prompt, averaged over images.

All three are reported as raw cosines in [-1, 1] (DreamBooth's published 0.668 / 0.803 / 0.305), not x100.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm, in float32 (fp16 embeddings lose digits in the dot products)."""
    return torch.nn.functional.normalize(x.float(), dim=-1)


def pair_cosines(generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """(G, R): the cosine similarity of every generated embedding with every reference embedding."""
    return normalise(generated) @ normalise(references).T


def subject_fidelity(generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """(G,): each generated image's mean cosine over all references (CLIP-I or DINO per image)."""
    return pair_cosines(generated, references).mean(dim=1)


def prompt_fidelity(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """(N,): cosine of image i with text i (CLIP-T per image); `texts` has one row per image."""
    if images.shape[0] != texts.shape[0]:
        raise ValueError(f"{images.shape[0]} image embeddings but {texts.shape[0]} text embeddings")
    return (normalise(images) * normalise(texts)).sum(dim=-1)


@dataclass(frozen=True)
class Estimate:
    """A mean with a 95% percentile-bootstrap interval over the per-image values it averages."""

    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"

    def as_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n}


def bootstrap(values, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> Estimate:
    """Mean of `values` with a percentile bootstrap interval (images resampled with replacement).

    The interval is conditional on the reference images and treats generated images as independent;
    a fixed seed makes it the same number every time for the same values.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("no values to average")
    mean = float(v.mean())
    if v.size == 1:
        return Estimate(mean, mean, mean, 1)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Estimate(mean, float(low), float(high), int(v.size))
