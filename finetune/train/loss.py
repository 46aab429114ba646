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
    return [hash_seed(seed, step, step * examples_per_step + int(p)) for p in positions]


def example_generator(key: int) -> torch.Generator:
    """The random stream of one example (noise, timestep, and whatever else an objective draws)."""
    return torch.Generator().manual_seed(key)


def example_noise(
    latents: torch.Tensor, num_timesteps: int, keys: list[int], noise_offset: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian noise and integer timesteps for each example, reproducible from its key (`example_keys`)."""
    return ddpm_draws(latents, num_timesteps, [example_generator(k) for k in keys], noise_offset)


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
    return torch.stack(noises).to(latents.device, latents.dtype), torch.cat(steps).to(latents.device)


def offset_noise(noise: torch.Tensor, g: torch.Generator, noise_offset: float) -> torch.Tensor:
    """Offset noise: a per-channel constant shift, so the model learns to change overall brightness. Drawn
    after everything else of the example, so switching it on changes nothing else."""
    if not noise_offset:
        return noise
    return noise + noise_offset * torch.randn((noise.shape[0], 1, 1), generator=g)


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


def diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None,
    is_prior: torch.Tensor | None,
    prior_weight: float,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Mean-squared error per example, weighted, split into instance and prior-preservation parts."""
    per_example = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
    if weights is not None:
        per_example = per_example * weights.float()
    if is_prior is None or not bool(is_prior.any()):
        loss = per_example.mean()
        return loss, {"loss": loss.detach()}
    prior = is_prior.to(per_example.device)
    inst_loss = per_example[~prior].mean() if bool((~prior).any()) else per_example.new_zeros(())
    prior_loss = per_example[prior].mean()
    loss = inst_loss + prior_weight * prior_loss
    return loss, {"loss": loss.detach(), "loss_instance": inst_loss.detach(), "loss_prior": prior_loss.detach()}
