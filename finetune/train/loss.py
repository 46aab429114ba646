"""The diffusion training objective: noise, timesteps, prediction target, Min-SNR weighting, prior split.

Noise and timesteps are drawn per example from a generator seeded by (seed, step, the example's position
among all examples of the run, as the data planner lays a step out). That makes a run reproducible on resume
without restoring RNG streams, and makes N processes with batch B, or one process accumulating N batches of
B, draw exactly the noise one process with batch N*B would. Any objective draws its randomness this way:
`example_keys` once per batch, then `example_generator(key)` per example.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr


def example_keys(seed: int, step: int, positions, examples_per_step: int) -> list[int]:
    """One seed per example: the run seed, the optimizer step and the example's place among all examples of
    the run (`positions`: places in the step's global batch, from the data planner)."""
    positions = positions.tolist() if isinstance(positions, torch.Tensor) else positions  # a host tensor
    return [hash_seed(seed, step, step * examples_per_step + int(p)) for p in positions]


def example_generator(key: int) -> torch.Generator:
    """The random stream of one example (noise, timestep, and whatever else an objective draws)."""
    return torch.Generator().manual_seed(key)


def ddpm_draws(
    latents: torch.Tensor, num_timesteps: int, gens: list[torch.Generator], noise_offset: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's noise, then its integer timestep, then (offset noise) its per-channel shift, drawn from
    the example's own generator."""
    noises, steps = [], []
    for g in gens:
        noise = torch.randn(latents.shape[1:], generator=g)
        steps.append(torch.randint(0, num_timesteps, (1,), generator=g))
        noises.append(offset_noise(noise, g, noise_offset))
    return host_to(torch.stack(noises), latents.device, latents.dtype), host_to(torch.cat(steps), latents.device)


def host_to(t: torch.Tensor, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor onto `device` without making the host wait: on a GPU through pinned memory with an
    asynchronous copy (a copy from pageable memory blocks the host). The noise is drawn on the CPU so an
    example's draws are the same on every device; tools/gpu_bench.sh times this against drawing on the GPU."""
    if torch.device(device).type == "cuda":
        t = t.to(device, non_blocking=True) if t.is_pinned() else t.pin_memory().to(device, non_blocking=True)
    else:
        t = t.to(device)
    return t if dtype is None else t.to(dtype)


def offset_noise(noise: torch.Tensor, g: torch.Generator, noise_offset: float) -> torch.Tensor:
    """Offset noise: a per-channel constant shift, so the model learns to change overall brightness. Drawn
    after everything else of the example, so switching it on changes nothing else."""
    if not noise_offset:
        return noise
    return noise + noise_offset * torch.randn((noise.shape[0], *[1] * (noise.ndim - 1)), generator=g)  # [C, (F,) H, W]


def hash_seed(*parts: int) -> int:
    """Mix integers into one 63-bit seed (splitmix64 over the parts)."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def target_for(scheduler, latents, noise, timesteps) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction type {kind!r} is not supported")


def snr_weights(scheduler, timesteps, gamma: float | None) -> torch.Tensor | None:
    """Min-SNR-gamma loss weights (Hang et al. 2023); None when disabled."""
    if gamma is None:
        return None
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def huber_c(shape, snr: torch.Tensor, t_frac: torch.Tensor) -> torch.Tensor:
    """Per-example Huber c by sd-scripts' schedules: 'snr' c + (1 - c) / (1 + sigma)^2 with sigma = 1/sqrt(SNR)
    (about 1, MSE-like, on nearly clean examples, c at high noise), 'exponential' c^(t/T), 'constant' c."""
    c = torch.full_like(snr, shape.huber_c)
    if shape.huber_schedule == "snr":
        sigma = snr.clamp(min=1e-12).rsqrt()
        return (1.0 - c) / (1.0 + sigma) ** 2 + c
    if shape.huber_schedule == "exponential":
        return c ** t_frac
    return c


def element_loss(pred: torch.Tensor, target: torch.Tensor, shape=None, snr=None, t_frac=None) -> torch.Tensor:
    """The loss of every element: squared error, or sd-scripts' pseudo-Huber / smooth-L1 with a per-example c."""
    diff = pred.float() - target.float()
    if shape is None or shape.type == "mse":
        return diff**2
    c = huber_c(shape, snr.float(), t_frac.float()).view(-1, *([1] * (diff.ndim - 1)))
    sq = diff**2
    root = sq / (torch.sqrt(sq + c**2) + c)  # = sqrt(d^2 + c^2) - c, without cancellation for small d
    return 2 * c * root if shape.type == "huber" else 2 * root


def debiased_weights(snr: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    """Debiased estimation (sd-scripts): 1/sqrt(SNR), or 1/(SNR + 1) for v-prediction; SNR capped at 1000."""
    snr = snr.float().clamp(max=1000.0)
    return 1.0 / (snr + 1.0) if v_prediction else snr.clamp(min=1e-12).rsqrt()


def masked_mean(loss: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over all but the batch dimension. A mask [B, 1, h, w] (latent resolution) weights every position;
    the mean is over the weights, so a small mask does not shrink the loss. Where the weight is 0 the element
    contributes nothing, so its gradient is exactly zero."""
    dims = list(range(1, loss.ndim))
    if mask is None:
        return loss.mean(dim=dims)
    w = mask.to(loss.device, loss.dtype).expand_as(loss)
    return (loss * w).sum(dim=dims) / w.sum(dim=dims).clamp(min=1e-6)


def diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None,
    is_prior: torch.Tensor | None,
    prior_weight: float,
    elements: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    preserve: torch.Tensor | None = None,
    preserve_weight: float = 1.0,
    extra: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Loss per example (squared error unless `elements` gives the element losses), masked and weighted, then
    split into instance, prior-preservation (class images) and base-prediction preservation parts.
    `is_prior` and `preserve` are the loader's host tensors: their counts are read on the host, and each part
    is a masked sum, not a boolean index (which reads the mask's size back from the device). `extra` is a
    per-example term added before the weights (the masked-out area's pull toward the base)."""
    if elements is None:
        elements = F.mse_loss(pred.float(), target.float(), reduction="none")
    per_example = masked_mean(elements, mask)
    if extra is not None:
        per_example = per_example + extra
    if weights is not None:
        per_example = per_example * weights.float()
    parts = {"prior": (is_prior, prior_weight), "preserve": (preserve, preserve_weight)}
    flags = {k: [bool(f) for f in m.tolist()] for k, (m, _) in parts.items() if m is not None}
    parts = {k: v for k, v in parts.items() if any(flags.get(k, ()))}
    if not parts:
        loss = per_example.mean()
        return loss, {"loss": loss.detach()}
    zero, device = per_example.new_zeros(()), per_example.device
    inst = [not any(flags[k][i] for k in parts) for i in range(per_example.shape[0])]

    def part_mean(host: list[bool]) -> torch.Tensor:
        chosen = host_to(torch.tensor(host), device)
        return torch.where(chosen, per_example, zero).sum() / sum(host) if any(host) else zero

    inst_loss = part_mean(inst)
    loss, logs = inst_loss, {"loss_instance": inst_loss.detach()}
    for name, (_, w) in parts.items():
        part = part_mean(flags[name])
        loss = loss + w * part
        logs[f"loss_{name}"] = part.detach()
    return loss, {"loss": loss.detach(), **logs}
