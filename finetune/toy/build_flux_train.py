"""Pretrain the FLUX toy transformer from scratch with rectified flow on the toy world.

The objective is FLUX's: x_s = (1 - s) x0 + s e with the model predicting e - x0, where x0 is the VAE
latent normalised as FLUX does, (z - shift_factor) * scaling_factor, packed into 2x2 patches with
`FluxPipeline._pack_latents` and placed with `_prepare_latent_image_ids`; the transformer gets s
(= timestep / 1000), the pooled CLIP output and the T5 hidden states. s is drawn logit-normal
(diffusers' `compute_density_for_timestep_sampling`) and shifted with the scheduler's own
resolution-dependent `time_shift`, so training and FluxPipeline sampling see the same noise levels.
Held-out subjects never appear here. The run checkpoints every few hundred steps and resumes.
"""

from __future__ import annotations

import copy
import os
import pathlib
import time

import torch
import torch.nn.functional as F

from finetune.toy import build_flux, world
from finetune.toy.build import encode_all, log, to_tensor

SIZE = world.SIZE


@torch.no_grad()
def embed_captions(parts: dict, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 hidden states (N, 32, 64) and pooled CLIP outputs (N, 64), exactly as FluxPipeline makes them."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline(transformer=None, vae=None, scheduler=None, **parts)
    t5, pooled = [], []
    for i in range(0, len(captions), 256):
        chunk = captions[i : i + 256]
        emb, pool, _ = pipe.encode_prompt(
            chunk, prompt_2=None, device="cpu", max_sequence_length=build_flux.MAX_SEQUENCE_LENGTH
        )
        t5.append(emb.float())
        pooled.append(pool.float())
    return torch.cat(t5), torch.cat(pooled)


def prepare_data(vae, text_parts: dict, n_images: int, seed: int) -> dict:
    """Raw latent of every world image and the conditioning of every distinct caption.

    Latents are the posterior means, as the trainer encodes (`latent_dist.mode()`): the toy VAE's
    posterior noise is several times the latents' spread in three channels (its KL weight is tiny),
    so sampled latents would bury the signal the transformer has to learn.
    """
    records = world.world_records(n_images, seed=seed + 1)  # the SD toy's U-Net data
    means, _ = encode_all(vae, to_tensor(world.to_array([img for img, _ in records])))
    table = [""] + sorted({c for _, caps in records for c in caps})  # row 0 = empty prompt for CFG
    index = {c: i for i, c in enumerate(table)}
    caps = torch.tensor([[index[c] for c in caps] for _, caps in records])
    t5, pooled = embed_captions(text_parts, table)
    log(f"data: {n_images} images, {len(table)} distinct captions, raw latents mean {means.mean():.3f}")
    return {"latents": means, "caps": caps, "t5": t5, "pooled": pooled}


class FlowObjective:
    """One rectified-flow training example batch for the toy transformer, FLUX's way."""

    def __init__(self, vae_config, scheduler, latent_hw: int):
        from diffusers import FluxPipeline
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        self.pack, self.unpack = FluxPipeline._pack_latents, FluxPipeline._unpack_latents
        self.shift, self.scale = vae_config.shift_factor, vae_config.scaling_factor
        self.hw = latent_hw
        self.vae_scale = SIZE // latent_hw
        self.img_ids = FluxPipeline._prepare_latent_image_ids(1, latent_hw // 2, latent_hw // 2, "cpu", torch.float32)
        self.txt_ids = torch.zeros(build_flux.MAX_SEQUENCE_LENGTH, 3)
        c = scheduler.config
        self.mu = calculate_shift(
            (latent_hw // 2) ** 2, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift
        )
        self.scheduler = scheduler

    def sigmas(self, batch: int, gen: torch.Generator) -> torch.Tensor:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling("logit_normal", batch, 0.0, 1.0, generator=gen)
        return self.scheduler.time_shift(self.mu, 1.0, u)

    def loss(self, model, raw_latents, t5, pooled, gen: torch.Generator) -> torch.Tensor:
        b, ch = raw_latents.shape[:2]
        x0 = (raw_latents - self.shift) * self.scale
        noise = torch.randn(x0.shape, generator=gen)
        s = self.sigmas(b, gen)
        xs = (1.0 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
        pred = model(
            hidden_states=self.pack(xs, b, ch, self.hw, self.hw),
            timestep=s,  # FluxPipeline passes timestep / 1000, which is the sigma itself
            pooled_projections=pooled,
            encoder_hidden_states=t5,
            txt_ids=self.txt_ids,
            img_ids=self.img_ids,
        ).sample
        pred = self.unpack(pred, SIZE, SIZE, self.vae_scale)
        return F.mse_loss(pred, noise - x0)


def _batch(data: dict, batch: int, uncond: float, gen: torch.Generator):
    idx = torch.randint(len(data["latents"]), (batch,), generator=gen)
    raw = data["latents"][idx]
    cap = data["caps"][idx, torch.randint(data["caps"].shape[1], (batch,), generator=gen)]
    cap[torch.rand(batch, generator=gen) < uncond] = 0  # empty prompt, so classifier-free guidance works
    return raw, data["t5"][cap], data["pooled"][cap]


@torch.no_grad()
def adaln_zero(model):
    """DiT's adaLN-Zero start: every modulation and the output projection at zero, so each block
    begins as the identity and the model as 'predict 0'. From-scratch DiTs train markedly faster so;
    diffusers' FluxTransformer2DModel keeps PyTorch's default init, made for loading weights."""
    mods = [model.norm_out.linear, model.proj_out]
    mods += [m for b in model.transformer_blocks for m in (b.norm1.linear, b.norm1_context.linear)]
    mods += [b.norm.linear for b in model.single_transformer_blocks]
    for m in mods:
        m.weight.zero_()
        m.bias.zero_()
    return model


def _save_checkpoint(path: pathlib.Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def optimizer_step(model, opt, sched, ema, loss: torch.Tensor) -> None:
    """Backward, clip to norm 1, AdamW and lr-schedule step, EMA update."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    ema.step(model.parameters())


def add_time(spent: dict, clock: tuple[float, float]) -> tuple[float, float]:
    """Add the wall and CPU minutes since `clock` (time, process_time) to `spent`; returns the new clock."""
    now = (time.time(), time.process_time())
    spent["minutes"] += (now[0] - clock[0]) / 60
    spent["cpu_minutes"] += (now[1] - clock[1]) / 60
    return now


class Trainer:
    """AdamW + warm-up/cosine + EMA over the transformer, with a resumable checkpoint."""

    def __init__(self, steps: int, seed: int, lr: float, ckpt: pathlib.Path, batch: int = 32, model=None,
                 warm: int = 200, ema_decay: float = 0.999, steps_flag: str = "--flux-steps"):
        """`model`: the transformer to train (default: a fresh one, adaLN-Zero initialised)."""
        from diffusers.training_utils import EMAModel

        self.steps, self.batch, self.ckpt, self.steps_flag = steps, batch, ckpt, steps_flag
        self.model = (model if model is not None else adaln_zero(build_flux.make_transformer(seed))).train()
        self.trained = [p for p in self.model.parameters() if p.requires_grad]  # all, or an adapter's
        self.ema = EMAModel(self.trained, decay=ema_decay)
        self.opt = torch.optim.AdamW(self.trained, lr=lr, weight_decay=1e-2)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt,
            lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / steps)).item()),
        )
        self.gen = torch.Generator().manual_seed(seed)
        self.step, self.running = 0, None
        self.spent = {"minutes": 0.0, "cpu_minutes": 0.0}  # summed over sittings, kept in the checkpoint
        self._clock = (time.time(), time.process_time())
        if ckpt.exists():
            self._load(torch.load(ckpt, weights_only=True))
            log(f"resumed from {ckpt} at step {self.step}")

    def _load(self, st: dict) -> None:
        if st["steps"] != self.steps:
            raise SystemExit(f"error: {self.ckpt} is a {st['steps']}-step run; pass {self.steps_flag} {st['steps']}")
        self.model.load_state_dict(st["model"])
        self.ema.load_state_dict(st["ema"])
        self.opt.load_state_dict(st["opt"])
        self.sched.load_state_dict(st["sched"])
        self.gen.set_state(st["gen"])
        self.step, self.running, self.spent = st["step"], st["running"], st["spent"]

    def tick(self) -> dict:
        """Add the wall and CPU time since the last tick to `spent` (CPU time: the cost on an unshared core)."""
        self._clock = add_time(self.spent, self._clock)
        return self.spent

    def save(self) -> None:
        self.tick()
        _save_checkpoint(
            self.ckpt,
            {
                "model": self.model.state_dict(),
                "ema": self.ema.state_dict(),
                "opt": self.opt.state_dict(),
                "sched": self.sched.state_dict(),
                "gen": self.gen.get_state(),
                "step": self.step,
                "steps": self.steps,
                "running": self.running,
                "spent": self.spent,
            },
        )

    def train_step(self, objective: FlowObjective, data: dict, uncond: float) -> float:
        raw, t5, pooled = _batch(data, self.batch, uncond, self.gen)
        return self.update(objective.loss(self.model, raw, t5, pooled, self.gen))

    def update(self, loss: torch.Tensor) -> float:
        """Back-propagate one batch's loss and take the optimizer, schedule and EMA steps."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trained, 1.0)
        self.opt.step()
        self.sched.step()
        self.ema.step(self.trained)
        self.step += 1
        self.running = loss.item() if self.running is None else 0.98 * self.running + 0.02 * loss.item()
        return loss.item()

    def ema_model(self):
        model = copy.deepcopy(self.model).eval()
        self.ema.copy_to([p for p in model.parameters() if p.requires_grad])
        return model.requires_grad_(False)


def quick_eval(parts: dict, model, seeds=(0,)) -> dict:
    """Colour / shape accuracy of every 'a {colour} {shape}' prompt, one seed: a cheap progress check."""
    from diffusers import FluxPipeline

    from finetune.toy import evaluate

    pipe = FluxPipeline(transformer=model, scheduler=build_flux.make_scheduler(), **parts)
    pipe.set_progress_bar_config(disable=True)
    summary, _ = evaluate.prompt_following(pipe, seeds=seeds, **build_flux.SAMPLER)
    return {k: round(summary[k], 3) for k in ("colour_acc", "shape_acc")}


def train(parts: dict, data: dict, trainer: Trainer, uncond: float = 0.1, eval_every: int = 1000) -> None:
    objective = FlowObjective(parts["vae"].config, build_flux.make_scheduler(), data["latents"].shape[-1])
    log(f"transformer: {sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f} M params, "
        f"{trainer.steps} steps at batch {trainer.batch}, from step {trainer.step}")
    t0, c0, first = time.time(), time.process_time(), trainer.step
    while trainer.step < trainer.steps:
        trainer.train_step(objective, data, uncond)
        s = trainer.step
        if s % 100 == 0 or s == trainer.steps:
            rate = (time.time() - t0) / (s - first)
            eta = (trainer.steps - s) * rate / 60
            lr = trainer.sched.get_last_lr()[0]
            cpu = (time.process_time() - c0) / (s - first)
            log(f"step {s}/{trainer.steps} loss {trainer.running:.4f} lr {lr:.2e} {rate:.3f} s/step "
                f"({cpu:.3f} CPU s/step), ETA {eta:.0f} min")
        if s % 500 == 0 or s == trainer.steps:
            trainer.save()
        if eval_every and s % eval_every == 0 and s < trainer.steps:
            log(f"step {s} EMA prompt following (1 seed): {quick_eval(parts, trainer.ema_model())}")


def build_flux_stage(workdir: pathlib.Path, out: pathlib.Path, steps: int, seed: int = 0,
                     lr: float = 1e-3, n_images: int = 24000) -> float:
    """Build the whole FLUX toy base into `out`; resumes from `workdir` if a run was interrupted."""
    from safetensors.torch import load_file, save_file

    workdir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(steps, seed, lr, workdir / f"flux_train_seed{seed}.pt")  # its clock starts now
    text = build_flux.text_components(seed)
    parts = {**text, "vae": build_flux.make_vae()}
    cache = workdir / f"flux_latents_{n_images}_seed{seed}.safetensors"  # T5 states depend on the seed
    if cache.exists():
        data = load_file(cache)
    else:
        data = prepare_data(parts["vae"], text, n_images, seed=0)
        save_file({k: v.contiguous() for k, v in data.items()}, cache)
    train(parts, data, trainer)
    info = {
        "transformer": {"steps": steps, "batch": trainer.batch, "lr": lr, "seed": seed, "images": n_images,
                        "timesteps": "logit_normal(0, 1), dynamic shift", "ema": 0.999, "caption_dropout": 0.1},
        "build_minutes": round(trainer.tick()["minutes"], 1),
        "build_cpu_minutes": round(trainer.spent["cpu_minutes"], 1),
        "sampler": dict(build_flux.SAMPLER, max_sequence_length=build_flux.MAX_SEQUENCE_LENGTH),
    }
    size = build_flux.save_flux_pipeline(out, {**parts, "transformer": trainer.ema_model()}, info)
    log(f"wrote {out} ({size:.1f} MB); build {info['build_minutes']} min, {info['build_cpu_minutes']} CPU min")
    return size
