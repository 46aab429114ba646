"""Train the toy video base from scratch: a causal video VAE on toy clips, then a Wan transformer with
rectified flow on the VAE's latents, exactly as the Wan family trains (finetune/models/families/wan.py):
latents are the posterior's mode normalised per channel with the VAE's `latents_mean` / `latents_std` (measured
here over the training clips and written into the VAE's config, as Wan ships them), x_s = (1 - s) x0 + s e
with the model predicting e - x0 at timestep s x 1000, s drawn logit-normal on the FlowMatch grid shifted by
the sampler's `flow_shift`. Captions are encoded once by the frozen UMT5 at 16 tokens, zeroed past each
caption (WanPipeline's padding); 10% are dropped to the empty caption so classifier-free guidance works.

Each stage checkpoints every few hundred steps under --workdir and resumes from there, so the one command
can be stopped and started again. Held-out motions never appear here.
"""

from __future__ import annotations

import copy
import os
import pathlib
import time

import numpy as np
import torch
import torch.nn.functional as F

from finetune.toy import build_video, video_world
from finetune.toy.build import log

DIT_BATCH = 16


def clips_uint8(clips) -> torch.Tensor:
    """uint8 [N, 3, F, H, W] from (frames, caption) pairs (a quarter of the float size in memory)."""
    return torch.from_numpy(np.stack([video_world.to_array(f) for f, _ in clips])).permute(0, 4, 1, 2, 3)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [-1, 1], the range the VAE takes."""
    return x.float().div(127.5).sub(1.0)


def clips_tensor(clips) -> torch.Tensor:
    return to_unit(clips_uint8(clips))


def _save(path: pathlib.Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load(path: pathlib.Path) -> dict:
    """A checkpoint of this module (weights only; the first builds kept numpy floats in the lr schedule)."""
    scalar = getattr(np, "_core", np.core).multiarray.scalar
    with torch.serialization.safe_globals([scalar, np.dtype, type(np.dtype("float64"))]):
        return torch.load(path, weights_only=True)


class Stage:
    """One resumable training stage: model, AdamW with warm-up + cosine, EMA, generator, spent time."""

    def __init__(self, model, steps: int, lr: float, seed: int, ckpt: pathlib.Path, ema: float = 0.999):
        from diffusers.training_utils import EMAModel

        self.model, self.steps, self.ckpt = model.train(), steps, ckpt
        self.ema = EMAModel(model.parameters(), decay=ema)
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
        warm = max(1, min(200, steps // 10))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: float(min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps))))
        self.gen = torch.Generator().manual_seed(seed)
        self.step, self.running, self.spent = 0, None, {"minutes": 0.0, "cpu_minutes": 0.0}
        self._clock = (time.time(), time.process_time())
        if ckpt.exists():
            st = _load(ckpt)
            if st["steps"] != steps:
                raise SystemExit(f"error: {ckpt} is a {st['steps']}-step run; pass the same step count")
            for name in ("model", "ema", "opt", "sched"):
                getattr(self, name).load_state_dict(st[name])
            self.gen.set_state(st["gen"])
            self.step, self.running, self.spent = st["step"], st["running"], st["spent"]
            log(f"resumed {ckpt.name} at step {self.step}/{steps}")

    def tick(self) -> dict:
        from finetune.toy.build_flux_train import add_time

        self._clock = add_time(self.spent, self._clock)
        return self.spent

    def save(self) -> None:
        self.tick()
        _save(self.ckpt, {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                          "opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "gen": self.gen.get_state(),
                          "step": self.step, "steps": self.steps, "running": self.running, "spent": self.spent})

    def update(self, loss: torch.Tensor) -> None:
        from finetune.toy.build_flux_train import optimizer_step

        optimizer_step(self.model, self.opt, self.sched, self.ema, loss)
        self.step += 1
        v = float(loss.detach())
        self.running = v if self.running is None else 0.98 * self.running + 0.02 * v

    def ema_model(self):
        model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.ema.copy_to(model.parameters())
        return model

    def run(self, loss_fn, name: str, every: int = 50, on_save=None) -> None:
        """Train to the last step; `on_save()` runs after each checkpoint (a progress check)."""
        t0, c0, first = time.time(), time.process_time(), self.step
        while self.step < self.steps:
            self.update(loss_fn(self.gen))
            s = self.step
            if s % every == 0 or s == self.steps:
                rate, cpu = (time.time() - t0) / (s - first), (time.process_time() - c0) / (s - first)
                log(f"{name} step {s}/{self.steps} loss {self.running:.4f} lr {self.sched.get_last_lr()[0]:.2e} "
                    f"{rate:.2f} s/step ({cpu:.2f} CPU s/step), ETA {(self.steps - s) * rate / 60:.0f} min")
            if s % 250 == 0 or s == self.steps:
                self.save()
                if on_save is not None:
                    on_save()


# ---------------------------------------------------------------------------------------------- VAE
# the VAE stage itself (and why it trains a colour probe) is finetune/toy/build_video_vae.py


@torch.no_grad()
def latent_stats(vae, clips: torch.Tensor) -> tuple[list[float], list[float]]:
    z = torch.cat([vae.encode(clips[i:i + 32]).latent_dist.mode() for i in range(0, len(clips), 32)])
    return z.mean(dim=(0, 2, 3, 4)).tolist(), z.std(dim=(0, 2, 3, 4)).tolist()


# ---------------------------------------------------------------------------------------------- data
@torch.no_grad()
def prepare(vae, parts: dict, n_clips: int, seed: int) -> dict:
    """Normalised latents of every clip, and the UMT5 states of every distinct caption (row 0: empty)."""
    from diffusers import WanPipeline

    from finetune.models.families.wan import normalise

    clips = video_world.world_clips(n_clips, seed=seed)
    lat = []
    for i in range(0, n_clips, 64):
        x = clips_tensor(clips[i:i + 64])
        lat.append(normalise(vae, vae.encode(x).latent_dist.mode()))
    table = ["", *sorted({c for _, c in clips})]
    index = {c: i for i, c in enumerate(table)}
    pipe = WanPipeline(tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"], vae=None, scheduler=None)
    text, _ = pipe.encode_prompt(table, do_classifier_free_guidance=False,
                                 max_sequence_length=build_video.MAX_SEQUENCE_LENGTH, device="cpu")
    log(f"data: {n_clips} clips, {len(table)} distinct captions")
    return {"latents": torch.cat(lat), "caps": torch.tensor([index[c] for _, c in clips]), "text": text.float()}


# ---------------------------------------------------------------------------------------------- transformer
@torch.no_grad()
def adaln_zero(model):
    """DiT's adaLN-Zero start, in Wan's terms: the timestep projection, every block's modulation table and
    the output projection at zero, so each block's gated self-attention and feed-forward start shut and the
    model starts as 'predict 0' (from-scratch DiTs train markedly faster so; finetune/toy/build_flux_train.py)."""
    for p in (model.condition_embedder.time_proj.weight, model.condition_embedder.time_proj.bias,
              model.proj_out.weight, model.proj_out.bias, *(b.scale_shift_table for b in model.blocks)):
        p.zero_()
    return model


def transformer_stage(workdir: pathlib.Path, data: dict, steps: int, seed: int, lr: float = 1e-3):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    grid = FlowMatchEulerDiscreteScheduler(shift=build_video.FLOW_SHIFT).sigmas[:1000]
    stage = Stage(adaln_zero(build_video.make_transformer(seed)), steps, lr, seed, workdir / "video_transformer.pt")
    log(f"transformer: {sum(p.numel() for p in stage.model.parameters()) / 1e6:.2f} M params, {steps} steps "
        f"at batch {DIT_BATCH}, from step {stage.step}")

    def loss(gen):
        idx = torch.randint(len(data["latents"]), (DIT_BATCH,), generator=gen)
        x0, cap = data["latents"][idx], data["caps"][idx].clone()
        cap[torch.rand(DIT_BATCH, generator=gen) < 0.1] = 0
        noise = torch.randn(x0.shape, generator=gen)
        u = compute_density_for_timestep_sampling("logit_normal", DIT_BATCH, 0.0, 1.0, generator=gen)
        s = grid[(u * 1000).long().clamp(0, 999)]
        xs = (1 - s.view(-1, 1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1, 1) * noise
        pred = stage.model(hidden_states=xs, timestep=s * 1000, encoder_hidden_states=data["text"][cap],
                           return_dict=False)[0]
        return F.mse_loss(pred, noise - x0)

    stage.run(loss, "transformer")
    return stage.ema_model(), stage.spent

