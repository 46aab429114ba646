"""Base-prediction preservation and the rest of what turns a prediction into a loss (shape, mask, groups).

A preservation example (data.preservation) trains toward what the frozen base predicts for the same noisy
latent, timestep and caption: one extra forward of the denoiser without gradients, with every peft adapter
switched off (`adapters_off`), on those examples only. Whatever the objective (DDPM epsilon / v, rectified
flow), the family's `predict` returns the base's answer in the same space as the target, so the family and
objective need to know nothing about it. Compared with class images (data.prior), nothing is generated up
front, and the target is the base's own expectation rather than one noisy sample of it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch

from finetune.train.loss import debiased_weights, diffusion_loss, element_loss, masked_mean


@contextmanager
def adapters_off(modules):
    """Every peft adapter layer inside `modules` switched off (peft's own `enable_adapters`), then back on.
    requires_grad is restored exactly: peft's switch re-enables gradients of all active adapters, which would
    wake weights a method froze (pivotal tuning's phases)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for mod in modules for m in mod.modules() if isinstance(m, BaseTunerLayer)]
    grads = [(p, p.requires_grad) for mod in modules for p in mod.parameters()]
    was_off = [layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield len(layers)
    finally:
        for layer, off in zip(layers, was_off, strict=True):
            layer.enable_adapters(not off)
        for p, g in grads:
            p.requires_grad_(g)


def take(batch: dict[str, Any], idx: torch.Tensor, n: int) -> dict[str, Any]:
    """The examples `idx` of a batch of `n`: per-example tensors and lists are indexed, the rest kept."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == n:
            out[k] = v[idx.to(v.device)]
        elif isinstance(v, list) and v and all(isinstance(x, torch.Tensor) for x in v):  # one tensor per
            out[k] = [x[idx.to(x.device)] for x in v]  # conditioning image, each [B, ...]
        elif isinstance(v, list) and len(v) == n:
            out[k] = [v[i] for i in idx.tolist()]
        elif isinstance(v, dict):  # per-example tensors by name (the family's conditions)
            out[k] = take(v, idx, n)
        else:
            out[k] = v
    return out


def base_rows(t, batch: dict[str, Any]) -> list[bool]:
    """Host flags of the examples whose loss needs the base's prediction: preservation examples, and (data.masks
    with unmasked_target: base) examples whose mask leaves something out. Read from the loader's host tensors."""
    need = [bool(f) for f in batch["preserve"].tolist()] if "preserve" in batch else []
    masks = t.recipe.data.masks
    if masks is not None and masks.unmasked_target == "base" and "masked" in batch:
        flags = [bool(f) for f in batch["masked"].tolist()]
        need = [a or b for a, b in zip(need or [False] * len(flags), flags, strict=True)]
    return need


@torch.no_grad()
def base_predictions(t, example, text: dict[str, torch.Tensor], batch: dict[str, Any], keys: list[int],
                     need: list[bool]) -> torch.Tensor:
    """The frozen base's prediction (every adapter off) for the examples flagged in `need`, in the target's
    space; the other rows are the ordinary target. One forward without gradients over those examples only.
    `t` is the Trainer (its components, method, accelerator and the unwrapped trained modules)."""
    idx = torch.tensor([i for i, f in enumerate(need) if f], dtype=torch.long)
    n = len(need)
    comps = t.comps
    modules = [comps.named_modules()[name] for name in t.trained_names]
    sub = take(batch, idx, n)
    with adapters_off(modules), t.acc.autocast():
        if t.method.config.trains_text_encoder() and not batch.get("text"):
            # the base's text conditioning too (a text-encoder LoRA changes it)
            sub_text = t.encode_text(sub["captions"], [keys[i] for i in idx.tolist()])
        else:
            sub_text = take(text, idx, n)
        dev = example.noisy.device
        expert = comps.experts[comps.expert_at(t.state.step)[0]]  # the step's denoiser (Wan 2.2: an expert)
        base = comps.family.predict(expert, example.noisy[idx.to(dev)], example.timesteps[idx.to(dev)],
                                    sub_text, sub)
    out = example.target.clone()
    out[idx.to(out.device)] = base.to(out.dtype)
    return out


def training_loss(t, pred, target, example, batch, base=None) -> tuple[torch.Tensor, dict[str, Any]]:
    """The recipe's loss for one micro-batch: element loss (MSE / Huber), mask, weightings and groups.
    `base` (from `base_predictions`) is the base's prediction where the batch needs it: preservation examples
    train toward it everywhere, masked examples (data.masks.unmasked_target: base) in their masked-out area."""
    recipe = t.recipe
    shape = recipe.train.loss
    elements = element_loss(pred, target, shape, example.snr, example.t_frac)
    weights = example.weights
    if shape.debiased_estimation:
        v = getattr(t.objective, "prediction_type", None) == "v_prediction"
        extra = debiased_weights(example.snr, v).to(pred.device)
        weights = extra if weights is None else weights * extra
    mask, outside = batch.get("loss_mask"), None
    if mask is not None:
        from finetune.data.masks import to_latent, weighted

        cfg = recipe.data.masks
        inside = to_latent(mask, pred.shape[-2:]).to(pred.device)
        keep = batch.get("preserve")
        if keep is not None and bool(keep.any()):  # preservation examples match the base everywhere
            inside = torch.where(keep.to(inside.device).view(-1, 1, 1, 1), torch.ones_like(inside), inside)
        mask = weighted(inside, cfg.unmasked_weight)  # toward the image: 1 inside, unmasked_weight outside
        if cfg.unmasked_target == "base" and base is not None:
            # outside, also toward the base's prediction, so the adapter may not change what the base draws there:
            # its own mean over the masked-out area, added with base_weight (a small subject is not diluted by a
            # large background). Rows without a base prediction have an all-ones mask: nothing is added.
            to_base = element_loss(pred, base, shape, example.snr, example.t_frac)
            outside = cfg.base_weight * masked_mean(to_base, 1.0 - inside)
    prior, pres = recipe.data.prior, recipe.data.preservation
    return diffusion_loss(pred, target, weights, batch.get("is_prior"), prior.loss_weight if prior else 1.0,
                          elements=elements, mask=mask, preserve=batch.get("preserve"),
                          preserve_weight=pres.weight if pres else 1.0, extra=outside)
