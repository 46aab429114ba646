"""Optimizers (AdamW, bitsandbytes 8-bit AdamW, Adafactor) and learning-rate schedules (diffusers)."""

from __future__ import annotations

from typing import Any

import torch

from finetune.errors import UserError
from finetune.sections import TrainSection


def build_optimizer(groups: list[dict[str, Any]], cfg: TrainSection) -> torch.optim.Optimizer:
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(
            groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
            weight_decay=cfg.weight_decay, **adamw_kernel(groups, cfg),
        )
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except Exception as e:  # noqa: BLE001 - bitsandbytes fails in many ways on unsupported machines
            raise UserError(
                f"train.optimizer: adamw8bit needs bitsandbytes, which failed to load ({e}); use adamw"
            ) from None
        return bnb.optim.AdamW8bit(
            groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
            weight_decay=cfg.weight_decay,
        )
    from transformers.optimization import Adafactor

    # fixed learning rate (no relative step) so the recipe's lr and schedule mean what they say
    return Adafactor(
        groups, lr=cfg.lr, relative_step=False, scale_parameter=False, warmup_init=False,
        weight_decay=cfg.weight_decay,
    )


def adamw_kernel(groups: list[dict[str, Any]], cfg: TrainSection) -> dict[str, bool]:
    """One kernel launch for every trained tensor instead of a Python loop over them (torch's default on a CPU,
    where a LoRA's few hundred small tensors cost more in the loop than in the arithmetic): the fused kernel on
    CPUs and GPUs. Under fp16 the loss scaler must see a skipped step as skipped (accelerate then holds the
    learning-rate schedule), which the fused kernel hides by skipping inside: there the multi-tensor kernels."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    params = [p for g in groups for p in g["params"]]
    fusable = all(p.device.type in _get_fused_kernels_supported_devices() and p.is_floating_point()
                  and type(p) in (torch.Tensor, torch.nn.Parameter) for p in params)
    if cfg.mixed_precision != "fp16" and fusable:
        return {"fused": True}
    return {"foreach": all(p.device.type in ("cpu", "cuda") for p in params)}


def build_lr_scheduler(optimizer, cfg: TrainSection):
    """One schedule step per optimizer step (the accelerator is built with step_scheduler_with_optimizer off).

    A parameter group with `active_steps: (first, stop)` (a method's phase) runs its own copy of the schedule
    over its window only, warm-up included, and has learning rate 0 outside it."""
    from diffusers.optimization import get_scheduler

    windows = [g.get("active_steps") for g in optimizer.param_groups]
    if not any(windows):
        return get_scheduler(cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.warmup_steps,
                             num_training_steps=cfg.max_steps)
    lambdas = [_windowed(optimizer, cfg, *(w or (0, None))) for w in windows]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def _windowed(optimizer, cfg: TrainSection, first: int, stop: int | None):
    from diffusers.optimization import get_scheduler

    stop = cfg.max_steps if stop is None else min(stop, cfg.max_steps)
    # diffusers' schedule for the window's length, read off a throwaway optimizer with the same base lr
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=optimizer.defaults["lr"])
    inner = get_scheduler(cfg.lr_scheduler, optimizer=probe, num_warmup_steps=min(cfg.warmup_steps, stop - first),
                          num_training_steps=stop - first).lr_lambdas[0]

    def factor(step: int) -> float:
        return inner(step - first) if first <= step < stop else 0.0

    return factor
