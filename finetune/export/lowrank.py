"""Low-rank algebra on LoRA files: concatenate several LoRAs exactly, or SVD-compress / resize to a rank.

A LoRA layer's delta is B @ A (times its scale). Several LoRAs applied together sum their deltas, which is
exactly one LoRA whose A stacks every A and whose B stacks every (weight * scale * B): ranks add. SVD of
B @ A, computed through QR of the thin factors (never the full out x in matrix), gives the best lower-rank
approximation; we report the retained energy (sum of kept squared singular values / total) and the
relative Frobenius error, per layer and overall.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from finetune.errors import ModelError
from finetune.export.layers import Adapter, Layer


@dataclass
class LayerReport:
    name: str
    rank_in: int
    rank_out: int
    energy: float  # retained fraction of sum(s^2)
    rel_error: float  # ||dW - dW_k||_F / ||dW||_F


def _factors(adapter: Adapter, name: str, layer: Layer, weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B * weight * scale, A) of a layer whose delta is a plain product B @ A (its kind says so); others are
    refused with the file and layer named."""
    from finetune.export.adapters import low_rank_factors

    b, a = low_rank_factors(layer, f"{adapter.path}: layer '{name}' is {{what}}; merging ranks and resizing work on "
                            "plain LoRA layers (fuse it into the base instead)")
    return b * weight, a


def _lora_layer(b: torch.Tensor, a: torch.Tensor, dtype: torch.dtype) -> Layer:
    rank = a.shape[0]
    return Layer("lora", {"lora_A.weight": a.to(dtype).contiguous(), "lora_B.weight": b.to(dtype).contiguous()},
                 alpha=float(rank), rank=rank, scale=1.0)


def _dtype(adapter: Adapter) -> torch.dtype:
    return next(iter(next(iter(adapter.layers.values())).tensors.values())).dtype


def check_same_base(adapters: list[Adapter]) -> None:
    """Adapters that disagree on family, or on a shared layer's shape, were trained for different bases."""
    families = {a.metadata.get("finetune.family") for a in adapters} - {None}
    if len(families) > 1:
        raise ModelError(f"adapters for different families ({', '.join(sorted(families))}): "
                         + ", ".join(str(a.path) for a in adapters))
    shapes: dict[str, tuple[tuple, str]] = {}
    for adapter in adapters:
        for name, layer in adapter.layers.items():
            factors = layer.spec.low_rank(layer)
            if factors is None:
                continue
            b, a = factors
            shape = (b.shape[0], *a.shape[1:])
            seen = shapes.setdefault(name, (shape, str(adapter.path)))
            if seen[0] != shape:
                raise ModelError(f"{adapter.path}: layer '{name}' is {shape} but {seen[1]} has {seen[0]}: "
                                 "adapters for different bases cannot be merged")


def concat(adapters: list[Adapter], weights: list[float]) -> Adapter:
    """One LoRA equal to applying all of them (with their weights) together; its rank is the sum of ranks."""
    check_same_base(adapters)
    for adapter in adapters:
        if adapter.replaced:
            raise ModelError(f"{adapter.path}: carries whole norm weights (a Control LoRA trained with "
                             "train_norm_layers), which cannot be added to another LoRA's; apply it on its own")
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for adapter, w in zip(adapters, weights, strict=True):
        for name, layer in adapter.layers.items():
            parts.setdefault(name, []).append(_factors(adapter, name, layer, w))
    dtype = _dtype(adapters[0])
    layers = {}
    for name, fs in parts.items():
        b = torch.cat([b for b, _ in fs], dim=1)
        a = torch.cat([a for _, a in fs], dim=0)
        layers[name] = _lora_layer(b, a, dtype)
    first = adapters[0]  # its header keeps the module layout the names were read with
    return Adapter(layers=layers, format="diffusers", metadata=dict(first.metadata), path=first.path,
                   family=first.family)


def svd_factors(b: torch.Tensor, a: torch.Tensor):
    """U, S, Vh of b.flatten(1) @ a.flatten(1) without forming the product (QR of the thin factors)."""
    b2, a2 = b.flatten(1).double(), a.flatten(1).double()
    qb, rb = torch.linalg.qr(b2)
    qa, ra = torch.linalg.qr(a2.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    return qb @ u, s, vh @ qa.T


def _keep(s: torch.Tensor, rank: int | None, energy: float | None) -> int:
    total = (s**2).sum()
    if total == 0:
        return 1
    if rank is not None:
        return max(1, min(rank, int((s > 0).sum()) or 1, s.numel()))
    cum = torch.cumsum(s**2, 0) / total
    return int((cum < energy - 1e-12).sum().item()) + 1


def resize(adapter: Adapter, rank: int | None = None, energy: float | None = None) -> tuple[Adapter, list[LayerReport]]:
    """Each layer to `rank` (or to the fewest ranks keeping `energy` of sum(s^2)); reports the error."""
    if (rank is None) == (energy is None):
        raise ModelError("give exactly one of a rank or an energy threshold")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ModelError(f"energy threshold {energy} must be in (0, 1]")
    dtype, layers, reports = _dtype(adapter), {}, []
    for name, layer in adapter.layers.items():
        b, a = _factors(adapter, name, layer)
        limit = min(b.shape[0], a.flatten(1).shape[1])
        if rank is not None and rank > limit:
            raise ModelError(f"{adapter.path}: rank {rank} is larger than layer '{name}' allows ({limit})")
        u, s, vh = svd_factors(b, a)
        k = _keep(s, rank, energy)
        total = float((s**2).sum())
        kept = float((s[:k] ** 2).sum())
        root = s[:k].sqrt()
        new_b = (u[:, :k] * root).float().reshape(b.shape[0], k, *b.shape[2:])
        new_a = (root[:, None] * vh[:k]).float().reshape(k, *a.shape[1:])
        layers[name] = _lora_layer(new_b, new_a, dtype)
        energy_k = kept / total if total else 1.0
        reports.append(LayerReport(name, layer.rank, k, energy_k, max(0.0, 1.0 - energy_k) ** 0.5))
    out = Adapter(layers=layers, format=adapter.format, metadata=dict(adapter.metadata), path=adapter.path,
                  family=adapter.family, replaced=dict(adapter.replaced))
    return out, reports


def summary(reports: list[LayerReport]) -> str:
    if not reports:
        return "no layers"
    ranks = sorted({r.rank_out for r in reports})
    worst = max(reports, key=lambda r: r.rel_error)
    mean_e = sum(r.energy for r in reports) / len(reports)
    return (f"{len(reports)} layers, ranks {ranks[0]}..{ranks[-1]}; retained energy mean {mean_e:.4f}, "
            f"min {min(r.energy for r in reports):.4f}; worst relative error {worst.rel_error:.4g} ({worst.name})")
