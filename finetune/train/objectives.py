"""Training objectives: how a clean latent becomes a training example (noisy input, timestep, target, weight).

- `DDPMObjective`: epsilon or v-prediction on the base's DDPM noise schedule, optional Min-SNR weighting.
- `FlowObjective`: rectified flow (SD3, FLUX, ...): x_t = (1 - s) x0 + s e, target e - x0, with the
  timestep density (uniform, logit-normal, mode, sigmoid), a static or resolution-dependent shift and the SD3
  loss weightings, using diffusers' own helpers and the base scheduler's sigma grid.

Every random draw of an example (its noise, then its timestep) comes from that example's own generator,
seeded by its global position in the run (finetune/train/loss.py), so resume is exact and N processes
draw what one process would. The family says which objective fits it (`Family.objective`); recipe options
for the other objective are refused at recipe time (`check_objective_options`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from finetune.train.loss import ddpm_draws, host_to, offset_noise, snr_weights, target_for


@dataclass
class Example:
    noisy: torch.Tensor  # the denoiser's input, in the VAE's latent layout
    timesteps: torch.Tensor  # what the denoiser is given (DDPM: integer steps; flow: sigma * 1000)
    target: torch.Tensor
    weights: torch.Tensor | None  # per-example loss weights (None: all 1)
    sigmas: torch.Tensor | None = None  # flow: the noise level of each example
    snr: torch.Tensor | None = None  # signal-to-noise ratio of each example (Huber schedules, debiased weights)
    t_frac: torch.Tensor | None = None  # each example's timestep as a fraction of the schedule, in [0, 1]


class DDPMObjective:
    """Epsilon / v-prediction on the base's DDPM schedule (SD 1.x, 2.x, SDXL)."""

    kind = "ddpm"

    def __init__(self, scheduler, min_snr_gamma: float | None = None, noise_offset: float = 0.0):
        self.scheduler, self.min_snr_gamma, self.noise_offset = scheduler, min_snr_gamma, noise_offset
        self.prediction_type = scheduler.config.prediction_type

    def example(self, latents: torch.Tensor, gens: list[torch.Generator], t_range=None) -> Example:
        noise, timesteps = ddpm_draws(latents, self.scheduler.config.num_train_timesteps, gens, self.noise_offset)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        target = target_for(self.scheduler, latents, noise, timesteps)
        from diffusers.training_utils import compute_snr

        n = self.scheduler.config.num_train_timesteps
        return Example(noisy, timesteps, target, snr_weights(self.scheduler, timesteps, self.min_snr_gamma),
                       snr=compute_snr(self.scheduler, timesteps).float(), t_frac=timesteps.float() / n)

    def describe(self) -> str:
        return self.prediction_type


class FlowObjective:
    """Rectified flow on the base's FlowMatchEulerDiscreteScheduler grid.

    A timestep is drawn as u in (0, 1) from the chosen density, mapped to the index floor(u * N) of the
    scheduler's N training sigmas (shifted statically by the scheduler's `shift`, as diffusers' SD3 / FLUX
    training scripts do), then, with the resolution-dependent shift, moved by the scheduler's own
    `time_shift` with mu from the image's token count (diffusers' `calculate_shift`)."""

    kind = "flow"

    def __init__(self, scheduler, sampling: str, weighting: str, noise_offset: float = 0.0,
                 logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29,
                 sigmoid_scale: float = 1.0, resolution_shift: bool = False, patch_size: int = 2):
        self.scheduler = scheduler
        self.sampling, self.weighting, self.noise_offset = sampling, weighting, noise_offset
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.sigmoid_scale, self.resolution_shift, self.patch_size = sigmoid_scale, resolution_shift, patch_size

    def draw_u(self, g: torch.Generator) -> torch.Tensor:
        """One u in (0, 1) from the timestep density (diffusers' sampler; 'sigmoid' is sigmoid(scale * N(0,1)))."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        if self.sampling == "sigmoid":
            return torch.sigmoid(self.sigmoid_scale * torch.randn((1,), generator=g))
        scheme = "none" if self.sampling == "uniform" else self.sampling
        return compute_density_for_timestep_sampling(scheme, 1, logit_mean=self.logit_mean,
                                                     logit_std=self.logit_std, mode_scale=self.mode_scale,
                                                     generator=g)

    def sigmas_for(self, u: torch.Tensor, latents: torch.Tensor, t_range=None) -> torch.Tensor:
        first, count = self.grid_window(t_range)
        index = (first + (u * count).long()).clamp(first, first + count - 1)
        sigmas = self.scheduler.sigmas[index].float()
        if self.resolution_shift:
            sigmas = self.scheduler.time_shift(self.mu(latents), 1.0, sigmas)
        return sigmas

    def grid_window(self, t_range) -> tuple[int, int]:
        """(first index, count) of the training grid's sigmas whose timestep lies in `t_range` = [lo, hi)
        (an expert's share, hi = num_train_timesteps included); the whole grid for None. u then maps into that
        window, so the density keeps its shape, squeezed to the expert's noise levels."""
        n = self.scheduler.config.num_train_timesteps
        if t_range is None:
            return 0, n
        t = self.scheduler.sigmas[:n].float() * n
        lo, hi = t_range
        inside = ((t >= lo) & ((t < hi) | (hi >= n))).nonzero().flatten()
        if not len(inside):
            raise ValueError(f"no training timestep lies in {t_range}")
        return int(inside[0]), int(inside[-1]) - int(inside[0]) + 1

    def mu(self, latents: torch.Tensor) -> float:
        """The resolution-dependent shift exponent for this latent size (tokens after 2x2 patching)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = self.scheduler.config
        seq = (latents.shape[-2] // self.patch_size) * (latents.shape[-1] // self.patch_size)
        return calculate_shift(seq, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                               c.get("base_shift", 0.5), c.get("max_shift", 1.15))

    def example(self, latents: torch.Tensor, gens: list[torch.Generator], t_range=None) -> Example:
        """`t_range`: [lo, hi) timesteps the examples must fall in (an expert's share of the schedule)."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        noises, us = [], []
        for g in gens:
            noise = torch.randn(latents.shape[1:], generator=g)
            us.append(self.draw_u(g))
            noises.append(offset_noise(noise, g, self.noise_offset))
        noise = host_to(torch.stack(noises), latents.device, latents.dtype)
        sigmas = host_to(self.sigmas_for(torch.cat(us), latents, t_range), latents.device)
        s = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
        noisy = (1.0 - s) * latents + s * noise
        weights = None
        if self.weighting == "precondition":
            # SD3's preconditioned output x_t - s v against x0 differs from the target by s (e - x0 - v): its
            # squared error is s^2 times the flow loss's (diffusers' SD3 script's precondition_outputs)
            weights = sigmas.float() ** 2
        elif self.weighting != "none":
            weights = compute_loss_weighting_for_sd3(self.weighting, sigmas).float()
        timesteps = sigmas * self.scheduler.config.num_train_timesteps
        # x_t = (1 - s) x0 + s e: signal over noise amplitude (1 - s) / s, squared
        snr = ((1.0 - sigmas.float()) / sigmas.float().clamp(min=1e-6)) ** 2
        return Example(noisy, timesteps, noise - latents, weights, sigmas, snr=snr, t_frac=sigmas.float())

    def describe(self) -> str:
        c = self.scheduler.config
        if self.resolution_shift:
            shift = f"resolution shift (mu {c.get('base_shift', 0.5):g} to {c.get('max_shift', 1.15):g})"
        else:
            shift = f"shift {c.get('shift', 1.0):g}"
        weighting = "" if self.weighting == "none" else f", {self.weighting} weighting"
        return f"flow, {self.sampling}, {shift}{weighting}"


def build_objective(family, scheduler, train):
    """The objective a family trains with: `scheduler` is the components' training scheduler (DDPM with the
    run's prediction type, or the base's flow-matching scheduler), `train` the recipe's train section."""
    if family.objective == "ddpm":
        return DDPMObjective(scheduler, train.min_snr_gamma, train.noise_offset)
    flow = train.flow
    resolution = resolution_shift_of(family, scheduler, flow)
    overrides: dict[str, Any] = {"use_dynamic_shifting": resolution}
    if flow.shift is not None:
        overrides["shift"] = flow.shift
    elif resolution or scheduler.config.get("use_dynamic_shifting"):
        # the resolution shift replaces the static one; and a base that shifts by resolution (FLUX) keeps its
        # static `shift` unused, so without the resolution shift its grid is unshifted (as diffusers' script)
        overrides["shift"] = 1.0
    grid = type(scheduler).from_config(scheduler.config, **overrides)
    sampling = flow.timestep_sampling if flow.timestep_sampling != "auto" else family.flow_defaults.get(
        "sampling", "uniform")
    return FlowObjective(grid, sampling, flow.weighting, train.noise_offset, flow.logit_mean, flow.logit_std,
                         flow.mode_scale, flow.sigmoid_scale, resolution, family.patch_size)


def resolution_shift_of(family, scheduler, flow) -> bool:
    """Whether the run shifts timesteps by image size. An explicit `train.flow.shift` is a static shift and
    turns the family's default resolution shift off: the scheduler applies one or the other, never both, so a
    shift ported from sd-scripts (3.1582) or musubi (2.2) must not be silently dropped (Family.check_recipe
    refuses `shift` with `resolution_shift: true`)."""
    if flow.resolution_shift is not None:
        return flow.resolution_shift
    if flow.shift is not None:
        return False
    return family.flow_defaults.get("resolution_shift", bool(scheduler.config.get("use_dynamic_shifting")))


def logit_normal_density(u: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """The density of sigmoid(N(mean, std)) at u (for tests of the sampler's histogram)."""
    logit = torch.log(u / (1 - u))
    return torch.exp(-((logit - mean) ** 2) / (2 * std**2)) / (std * math.sqrt(2 * math.pi) * u * (1 - u))
