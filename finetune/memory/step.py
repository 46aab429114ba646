"""Peak bytes of whole training steps (forward, backward, optimizer) with and without
`train.optimizer_in_backward`, counted by `LiveBytes` (finetune/memory/trace.py): on the meta device for
real-shaped bases (no memory, no arithmetic) and on real tensors for the tiny ones.

`tools/bench.py --step-memory` prints the before/after; tests/test_speed.py checks the drop on tiny models.
"""

from __future__ import annotations

from typing import Any
from unittest import mock

import torch

from finetune.memory.trace import LiveBytes, fused_attention


def step_peaks(recipe, device: str = "meta", steps: int = 2) -> dict[str, Any]:
    """The recipe's base with its method applied, stepped `steps` times the ordinary way and then (fresh
    weights, fresh optimizer) with the optimizer in the backward; the peak of the last step of each, above
    what was held before it (weights, and the optimizer state the first steps created)."""
    out = {}
    for in_backward in (False, True):
        comps, groups = _components(recipe, device)
        out["in_backward" if in_backward else "ordinary"] = _peak(comps, groups, recipe, in_backward, steps)
    trained = [p for g in groups for p in g["params"]]
    out["gradient_bytes"] = sum(p.numel() * 4 for p in trained)
    out["trained_tensors"] = len(trained)
    return out


DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _components(recipe, device: str):
    from finetune.models.components import cast_frozen

    if device == "meta":
        from finetune.memory.skeleton import meta_components

        comps = meta_components(recipe.base, recipe.model.load_options())
    else:
        from finetune.models.components import load_components

        comps = load_components(recipe.base.complete(), recipe.model.load_options())
    groups = recipe.method.build().setup(comps, recipe.train.lr)
    dtype = DTYPES[recipe.train.mixed_precision]
    cast_frozen(comps, dtype, dtype)
    comps.denoiser.to(device)
    return comps, groups


def _peak(comps, groups, recipe, in_backward: bool, steps: int) -> int:
    from finetune.train.in_backward import StepInBackward
    from finetune.train.optim import build_optimizer

    opt = build_optimizer(groups, recipe.train)
    params = [p for g in opt.param_groups for p in g["params"]]
    hooks = StepInBackward(opt, params) if in_backward else None
    inputs = _inputs(comps, recipe)
    peak = 0
    for _ in range(steps):
        if hooks:
            hooks.arm(True, set())
        with mock.patch("torch.nn.functional.scaled_dot_product_attention", fused_attention), LiveBytes() as live:
            loss = _loss(comps, inputs, recipe)
            loss.backward()
            del loss
            if not hooks:
                opt.step()
                opt.zero_grad(set_to_none=True)
        peak = live.peak
    if hooks:
        hooks.remove()
    return peak


def _inputs(comps, recipe) -> dict[str, Any]:
    den = comps.denoiser
    device = next(den.parameters()).device
    dtype = DTYPES[recipe.train.mixed_precision]
    b = recipe.train.batch_size
    with torch.no_grad():
        text = comps.family.encode_prompt(comps, ["a photo"] * b, device) if comps.text_encoders else {}
    side = recipe.data.resolution // 2 ** (len(comps.vae.config.block_out_channels) - 1)
    size = torch.tensor([[recipe.data.resolution] * 2] * b, device=device)
    return {"text": {k: v.to(device, dtype) for k, v in text.items()},
            "noisy": torch.randn(b, comps.vae.config.latent_channels, side, side, device=device, dtype=dtype),
            "timesteps": torch.rand(b, device=device) * 1000,
            "batch": {"original_size": size, "crop_top_left": size * 0, "target_size": size, "guidance": 1.0}}


def _loss(comps, x, recipe) -> torch.Tensor:
    pred = comps.family.predict(comps.denoiser, x["noisy"], x["timesteps"], x["text"], x["batch"])
    return torch.nn.functional.mse_loss(pred.float(), torch.zeros_like(pred, dtype=torch.float32))
