"""The training arithmetic as numbers: Min-SNR weights, offset noise, learning-rate schedules (phases too),
Adafactor as configured, 8-bit AdamW against AdamW, and per-example keys that ignore the batch layout."""

from __future__ import annotations

import math

import pytest
import torch

from finetune.sections import TrainSection
from finetune.train.loss import ddpm_draws, example_generator, example_keys, snr_weights
from finetune.train.optim import build_lr_scheduler, build_optimizer


def ddpm(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         num_train_timesteps=1000, prediction_type=prediction_type)


def test_min_snr_weights_are_the_clipped_snr_ratio():
    t = torch.tensor([0, 100, 500, 999])
    ac = ddpm().alphas_cumprod[t].double()
    snr = ac / (1 - ac)
    eps = snr_weights(ddpm(), t, 5.0).double()
    v = snr_weights(ddpm("v_prediction"), t, 5.0).double()
    assert torch.allclose(eps, snr.clamp(max=5) / snr, rtol=1e-5)
    assert torch.allclose(v, snr.clamp(max=5) / (snr + 1), rtol=1e-5)
    # by hand: at t=0 alpha_bar = 1 - 0.00085, snr = 0.99915 / 0.00085 = 1175.5, weight 5 / 1175.5
    assert eps[0].item() == pytest.approx(5 / 1175.47, rel=1e-3)
    assert eps[-1].item() == pytest.approx(1.0)  # high noise: snr < 5, nothing clipped
    assert v[-1].item() == pytest.approx(float(snr[-1] / (snr[-1] + 1)), rel=1e-5) and v[-1] < 0.01
    assert snr_weights(ddpm(), t, None) is None


def test_offset_noise_shifts_each_channel_by_a_constant():
    latents = torch.zeros(512, 4, 8, 8)
    keys = example_keys(1, 0, range(512), 512)
    plain, steps = ddpm_draws(latents, 1000, [example_generator(k) for k in keys], 0.0)
    offset, steps2 = ddpm_draws(latents, 1000, [example_generator(k) for k in keys], 0.1)
    assert torch.equal(steps, steps2)  # same example, same timestep; only the noise moves
    shift = offset - plain
    assert float(shift.std(dim=(2, 3)).max()) < 1e-6, "the offset is one constant per channel and example"
    per_channel = shift.mean(dim=(2, 3))  # [512, 4]: N(0, 0.1^2) draws
    assert 0.085 < float(per_channel.std()) < 0.115
    assert abs(float(per_channel.mean())) < 0.015
    assert float(plain.std()) == pytest.approx(1.0, abs=0.02)


def test_example_keys_depend_on_step_and_position_only():
    a = example_keys(3, 5, [0, 1, 2, 3], 4)
    assert a[2:] == example_keys(3, 5, [2, 3], 4)  # the same example in a smaller micro-batch
    assert len(set(a)) == 4 and set(a).isdisjoint(example_keys(3, 6, [0, 1, 2, 3], 4))
    assert a != example_keys(4, 5, [0, 1, 2, 3], 4)


def lrs(groups, steps: int, **train) -> list[list[float]]:
    cfg = TrainSection(max_steps=steps, lr=1.0, **train)
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in groups]
    opt = torch.optim.SGD([{"params": [p], **g} for p, g in zip(params, groups, strict=True)], lr=1.0)
    sched = build_lr_scheduler(opt, cfg)
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


def test_cosine_with_warmup_follows_the_formula():
    got = [row[0] for row in lrs([{}], 10, lr_scheduler="cosine", warmup_steps=2)]
    expected = [0.0, 0.5] + [0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)]
    assert got == pytest.approx(expected, abs=1e-9)


def test_a_phase_runs_its_own_schedule_and_warmup_in_its_window():
    """Pivotal's LoRA group trains in steps [3, 10): learning rate 0 before, then warm-up and cosine over its
    7 steps; the token group trains in [0, 3) with its own 3-step schedule."""
    rows = lrs([{"active_steps": (0, 3)}, {"active_steps": (3, None)}], 10, lr_scheduler="cosine", warmup_steps=2)
    tokens, lora = [r[0] for r in rows], [r[1] for r in rows]
    assert lora[:3] == [0.0, 0.0, 0.0]
    cosine7 = [0.5 * (1 + math.cos(math.pi * (s - 2) / 5)) for s in range(2, 7)]
    assert lora[3:] == pytest.approx([0.0, 0.5, *cosine7], abs=1e-9)
    assert tokens == pytest.approx([0.0, 0.5, 1.0] + [0.0] * 7, abs=1e-9)


def test_adafactor_takes_fixed_lr_steps():
    """Fixed learning rate, no relative step, no parameter scaling: the first step moves every entry by
    exactly lr (the update is RMS-normalised to sign(grad)), after decoupled weight decay."""
    p = torch.nn.Parameter(torch.full((8,), 0.5))
    opt = build_optimizer([{"params": [p], "lr": 0.003}], TrainSection(optimizer="adafactor", lr=0.003))
    p.grad = torch.tensor([1.0, -2.0, 0.5, -0.1, 3.0, -1.0, 0.2, -0.7])
    opt.step()
    expected = 0.5 * (1 - 0.01 * 0.003) - 0.003 * torch.sign(p.grad)
    assert torch.allclose(p.detach(), expected, atol=1e-7)


def test_adamw8bit_steps_like_adamw():
    """bitsandbytes' AdamW8bit keeps 8-bit moments (for tensors of 4096+ entries) and moves weights as torch's
    AdamW does, within the quantisation error."""
    pytest.importorskip("bitsandbytes")
    g = torch.Generator().manual_seed(0)
    start = torch.randn(64, 64, generator=g)
    grads = [torch.randn(64, 64, generator=g) for _ in range(5)]
    moved = {}
    for kind in ("adamw", "adamw8bit"):
        p = torch.nn.Parameter(start.clone())
        opt = build_optimizer([{"params": [p], "lr": 1e-2}], TrainSection(optimizer=kind, lr=1e-2))
        for grad in grads:
            p.grad = grad.clone()
            opt.step()
        moved[kind] = p.detach() - start
        if kind == "adamw8bit":
            assert opt.state[p]["state1"].dtype == torch.uint8
    err = (moved["adamw8bit"] - moved["adamw"]).norm() / moved["adamw"].norm()
    assert float(moved["adamw"].abs().mean()) > 0.02 and float(err) < 0.05, float(err)
