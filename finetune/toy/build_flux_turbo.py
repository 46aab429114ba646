"""Distil the FLUX toy base into a few-step student: the toy's FLUX.1 [schnell] / Z-Image-Turbo.

The teacher is the committed base sampled as it is meant to be (Euler, true CFG 5 against the empty prompt),
on a fine sigma grid that passes through the student's own 4 sigmas (the ones FluxPipeline uses for 4 steps at
64 px). The student starts as the base's transformer and learns, for each of its 4 sigmas, the one velocity whose
single Euler step lands where the teacher's 7 guided steps landed: a regression on cached teacher trajectories,
piecewise over 4 windows (PeRFlow's piecewise reflow, with the guided teacher's endpoints as the targets). It
samples in 4 forwards without CFG instead of 56: step- and guidance-distilled, like [schnell] and Turbo.

    python tools/make_toy_model.py --flux-turbo      # trajectories, then the student; resumes where it stopped

Same architecture and parameter names as the base, so a LoRA trained on one applies to the other (route 1 of
docs/toy.md), and the folder differs from base_flux/ only in its transformer and toy_build.json: git stores the
identical files once.
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np
import torch
import torch.nn.functional as F

from finetune.toy import build_flux, toy_flux_base_path, world
from finetune.toy.build import log

STEPS = 4  # the student's sampling steps
SUB = 7  # teacher Euler steps per student step: 28 in all, as the base is sampled
GUIDANCE = build_flux.SAMPLER["guidance"]  # the teacher's true CFG scale
SAMPLER = dict(steps=STEPS, guidance=1.0)  # guidance 1: no CFG (FluxPipeline runs true CFG only above 1)
CHUNK = 64  # trajectories per cached file (and per teacher batch: 128 rows with the unconditional half)


def load_teacher():
    """The committed FLUX toy base in fp32: its components by name (transformer, vae, encoders, tokenizers)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(toy_flux_base_path(), dtype=torch.float32)
    return dict(pipe.components)


def knots(scheduler, steps: int = STEPS, tokens: int = 64) -> torch.Tensor:
    """The sigmas FluxPipeline samples a 64 px toy image (64 tokens) with in `steps` steps, the final 0 included."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = scheduler.config
    mu = calculate_shift(tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler.sigmas.float().clone()


def fine_grid(student_knots: torch.Tensor, sub: int = SUB) -> torch.Tensor:
    """`sub` evenly spaced teacher steps inside each student step; every student knot is on the grid."""
    pairs = zip(student_knots[:-1], student_knots[1:], strict=True)
    parts = [torch.linspace(float(a), float(b), sub + 1)[:-1] for a, b in pairs]
    return torch.cat([*parts, student_knots[-1:]])


class Text:
    """The conditioning of every caption in a table (row 0: the empty prompt), and the fixed position ids."""

    def __init__(self, parts: dict, captions: list[str]):
        from diffusers import FluxPipeline

        from finetune.toy.build_flux_train import embed_captions

        self.table = ["", *sorted(set(captions) - {""})]
        self.index = {c: i for i, c in enumerate(self.table)}
        self.t5, self.pooled = embed_captions(
            {k: parts[k] for k in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}, self.table)
        self.txt_ids = torch.zeros(build_flux.MAX_SEQUENCE_LENGTH, 3)
        self.img_ids = FluxPipeline._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32)  # 8x8 tokens

    def forward(self, model, x: torch.Tensor, sigma: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
        """The transformer's velocity for packed latents `x` [B, 64, 16] at `sigma` [B], captions `caps` [B]."""
        return model(hidden_states=x, timestep=sigma, pooled_projections=self.pooled[caps],
                     encoder_hidden_states=self.t5[caps], txt_ids=self.txt_ids, img_ids=self.img_ids).sample


def caption_pool(n: int, seed: int) -> list[str]:
    """One caption per trajectory, every variant the world writes (short ones too), from `seed`."""
    rng = np.random.default_rng(seed)
    return [caps[rng.integers(len(caps))] for _, caps in world.world_records(n, seed=seed)]


@torch.no_grad()
def teacher_trajectory(teacher, text: Text, caps: torch.Tensor, noise: torch.Tensor, grid: torch.Tensor,
                       keep: torch.Tensor, guidance: float = GUIDANCE) -> torch.Tensor:
    """Euler with true CFG over `grid` from `noise`; returns the latents at the `keep` grid points [B, K, 64, 16]."""
    x, out = noise, [noise]
    empty = torch.zeros_like(caps)
    for i in range(len(grid) - 1):
        s = grid[i].expand(2 * len(caps))
        v = text.forward(teacher, torch.cat([x, x]), s, torch.cat([caps, empty]))
        cond, uncond = v.chunk(2)
        x = x + (grid[i + 1] - grid[i]) * (uncond + guidance * (cond - uncond))
        if (i + 1) in keep:
            out.append(x)
    return torch.stack(out, dim=1)


def make_trajectories(workdir: pathlib.Path, teacher: dict, text: Text, captions: list[str], spent: dict) -> dict:
    """Every trajectory, cached in chunks under `workdir` (an interrupted run redoes one chunk at most)."""
    from safetensors.torch import load_file, save_file

    folder = workdir / "turbo_trajectories"
    folder.mkdir(parents=True, exist_ok=True)
    student_knots = knots(teacher["scheduler"])
    grid = fine_grid(student_knots)
    keep = torch.arange(1, STEPS + 1) * SUB  # grid indices of the student's knots after the first
    xs, cs = [], []
    chunks = (len(captions) + CHUNK - 1) // CHUNK
    for k in range(chunks):
        path = folder / f"chunk_{k:04d}.safetensors"
        if not path.exists():
            t0, c0 = time.time(), time.process_time()
            caps = torch.tensor([text.index[c] for c in captions[k * CHUNK:(k + 1) * CHUNK]])
            noise = torch.randn(len(caps), 64, 16, generator=torch.Generator().manual_seed(10_000 + k))
            traj = teacher_trajectory(teacher["transformer"], text, caps, noise, grid, keep)
            save_file({"x": traj.contiguous(), "caps": caps}, path)
            spent["minutes"] += (time.time() - t0) / 60
            spent["cpu_minutes"] += (time.process_time() - c0) / 60
            if k % 4 == 3 or k == chunks - 1:
                log(f"trajectories: chunk {k + 1}/{chunks}, {spent['cpu_minutes']:.1f} CPU min so far")
        data = load_file(path)
        xs.append(data["x"])
        cs.append(data["caps"])
    return {"x": torch.cat(xs), "caps": torch.cat(cs), "knots": student_knots}


def distil_loss(model, text: Text, data: dict, batch: int, gen: torch.Generator) -> torch.Tensor:
    """One batch of trajectories, every window: from the teacher's latent at a student sigma, the velocity that
    reaches the teacher's latent at the next one in one Euler step."""
    idx = torch.randint(len(data["x"]), (batch,), generator=gen)
    x, s = data["x"][idx], data["knots"]
    start, end = x[:, :-1].flatten(0, 1), x[:, 1:].flatten(0, 1)  # [B * 4, 64, 16], window-major per trajectory
    sigma, step = s[:-1].repeat(batch), (s[1:] - s[:-1]).repeat(batch)
    target = (end - start) / step.view(-1, 1, 1)
    pred = text.forward(model, start, sigma, data["caps"][idx].repeat_interleave(STEPS))
    return F.mse_loss(pred, target)


def train_student(workdir: pathlib.Path, teacher: dict, text: Text, data: dict, steps: int, lr: float,
                  batch: int, seed: int = 0):
    """Fine-tune a copy of the teacher's transformer into the student (resumable); returns the trainer."""
    import copy

    from finetune.toy.build_flux_train import Trainer

    student = copy.deepcopy(teacher["transformer"]).requires_grad_(True)
    trainer = Trainer(steps, seed, lr, workdir / f"flux_turbo_student_seed{seed}.pt", batch=batch, model=student,
                      warm=50, ema_decay=0.995, steps_flag="--turbo-steps")
    t0, first = time.time(), trainer.step
    while trainer.step < steps:
        trainer.update(distil_loss(trainer.model, text, data, batch, trainer.gen))
        s = trainer.step
        if s % 50 == 0 or s == steps:
            rate = (time.time() - t0) / (s - first)
            log(f"student step {s}/{steps} loss {trainer.running:.4f} lr {trainer.sched.get_last_lr()[0]:.2e} "
                f"{rate:.2f} s/step, ETA {(steps - s) * rate / 60:.0f} min")
        if s % 250 == 0 or s == steps:
            trainer.save()
    return trainer


def evaluate_student(teacher: dict, student, seeds=(0, 1, 2, 3)) -> dict:
    """Prompt following at 4 steps: the student without CFG, the base without and with CFG (same seeds)."""
    from diffusers import FluxPipeline

    from finetune.toy import evaluate

    out = {}
    parts = {k: v for k, v in teacher.items() if k != "transformer"}
    for name, model, guidance in (("student", student, 1.0), ("base, no CFG", teacher["transformer"], 1.0),
                                  (f"base, CFG {GUIDANCE:g}", teacher["transformer"], GUIDANCE)):
        pipe = FluxPipeline(transformer=model, **parts)
        pipe.set_progress_bar_config(disable=True)
        summary, _ = evaluate.prompt_following(pipe, seeds=seeds, steps=STEPS, guidance=guidance)
        out[name] = {k: round(summary[k], 3) for k in ("colour_acc", "shape_acc", "both_acc")}
        log(f"{STEPS} steps, {name}: {out[name]}")
    return out


def share_with_base(out: pathlib.Path) -> None:
    """Every file but the transformer's weights and toy_build.json as the base's own bytes (configs written from a
    loaded model record where it was loaded from), so git stores one copy of each."""
    import shutil

    base = toy_flux_base_path()
    for src in base.rglob("*"):
        rel = src.relative_to(base)
        if src.is_file() and str(rel) not in ("transformer/diffusion_pytorch_model.safetensors", "toy_build.json"):
            shutil.copyfile(src, out / rel)


def build_flux_turbo(workdir: pathlib.Path, out: pathlib.Path, trajectories: int = 128, steps: int = 60,
                     lr: float = 2e-4, batch: int = 16, seed: int = 0) -> dict:
    """Distil the committed FLUX toy base into `out` (toy-flux-turbo); resumes from `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    spent_file = workdir / f"flux_turbo_trajectories_{trajectories}.json"
    spent = json.loads(spent_file.read_text()) if spent_file.exists() else {"minutes": 0.0, "cpu_minutes": 0.0}
    teacher = load_teacher()
    captions = caption_pool(trajectories, seed=20 + seed)
    text = Text(teacher, captions)
    data = make_trajectories(workdir, teacher, text, captions, spent)
    spent_file.write_text(json.dumps(spent))
    log(f"{len(data['x'])} trajectories ({spent['cpu_minutes']:.1f} CPU min); student knots "
        f"{[round(float(s), 3) for s in data['knots']]}")
    trainer = train_student(workdir, teacher, text, data, steps, lr, batch, seed)
    student = trainer.ema_model()
    numbers = evaluate_student(teacher, student)
    info = {
        "distilled_from": "toy-flux",
        "distillation": {
            "kind": "step and guidance", "teacher_sampler": dict(build_flux.SAMPLER), "teacher_steps_per_step": SUB,
            "trajectories": trajectories, "captions": "world caption variants", "student_steps": steps,
            "batch_trajectories": batch, "lr": lr, "ema": 0.995, "knots": [round(float(s), 4) for s in data["knots"]],
        },
        "build_minutes": round(spent["minutes"] + trainer.tick()["minutes"], 1),
        "build_cpu_minutes": round(spent["cpu_minutes"] + trainer.spent["cpu_minutes"], 1),
        "sampler": dict(SAMPLER, max_sequence_length=build_flux.MAX_SEQUENCE_LENGTH),
        "prompt_following_4_steps": numbers,
    }
    parts = {k: teacher[k] for k in ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}
    size = build_flux.save_flux_pipeline(out, {**parts, "transformer": student}, info)
    share_with_base(out)
    log(f"wrote {out} ({size:.1f} MB); {info['build_cpu_minutes']} CPU min in all")
    return info
