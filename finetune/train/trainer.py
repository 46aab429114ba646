"""The training loop. Read it top to bottom: `train()` sets up, `Trainer.run()` loops, `finish()` exports.

The method decides what trains (finetune/methods); the family how prompts become conditioning and a batch
the denoiser's inputs (finetune/models/families); the objective how a clean latent becomes a noisy example
and its target (finetune/train/objectives.py); the data pipeline what a batch is (finetune/data). The loop
only does the step, and keeps the run safe: checkpoints, clean interrupts, non-finite guards.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from finetune.errors import RunError
from finetune.recipe import Recipe
from finetune.train import checkpoint as ckpt
from finetune.train.loss import example_generator, example_keys
from finetune.train.objectives import build_objective
from finetune.train.preserve import base_targets, training_loss
from finetune.train.setup import DTYPES, StopFlag, resume_fingerprint
from finetune.train.timing import PhaseTimer


class NonFiniteError(RunError):
    """Loss, gradients or weights went NaN/inf."""


def train(recipe: Recipe) -> Path:
    """Run the recipe end to end; returns the output folder."""
    from finetune.train.setup import check_output_dir, make_accelerator, quiet_libraries, write_run_files

    check_output_dir(recipe)
    quiet_libraries()
    acc = make_accelerator(recipe)
    trainer = Trainer(recipe, acc)  # base and data load first: a mistake there leaves no run folder behind
    if acc.is_main_process:
        write_run_files(recipe)
    trainer.run()
    return Path(recipe.train.output_dir)


class Trainer:
    def __init__(self, recipe: Recipe, acc):
        from accelerate.utils import set_seed

        from finetune.models.components import cast_frozen, load_components
        from finetune.models.detect import family_for
        from finetune.recipe import recheck_for_family

        self.recipe, self.acc, self.cfg = recipe, acc, recipe.train
        self.out = Path(self.cfg.output_dir)
        self.t_start = time.perf_counter()
        set_seed(self.cfg.seed)
        self.dtype = DTYPES[self.cfg.mixed_precision]
        comps = load_components(recipe.model)
        if recipe.model.family == "auto" and family_for(recipe.model) is None:
            recheck_for_family(recipe, comps.family.name)  # a hub id that was not cached at recipe time
        self.method = recipe.method.build()
        groups = self.method.setup(comps, self.cfg.lr)
        vae_dtype = self._vae_dtype(comps)
        cast_frozen(comps, self.dtype, vae_dtype)
        self.objective = build_objective(comps.family, comps.scheduler, self.cfg)  # before the scheduler moves
        denoiser = comps.denoiser
        if self.cfg.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        if self.cfg.channels_last:
            denoiser.to(memory_format=torch.channels_last)
        if self.cfg.compile:
            denoiser.compile()  # in place: parameter names (checkpoints, exports) stay the same
        device = acc.device
        denoiser.to(device)
        comps.vae.to(device)
        for enc in comps.text_encoders:
            enc.to(device)
        self.comps = comps
        if recipe.data.prior is not None:
            self._ensure_class_images()
        self._resolve_text_cache()
        self.data = self._build_data(vae_dtype)
        self.prompt_cache = self._release_text_encoders()
        self._build_optimization(groups)
        self.state = ckpt.TrainState(dataset_fingerprint=self.data.fingerprint,
                                     recipe_fingerprint=resume_fingerprint(recipe))
        self.stop = StopFlag()
        self.timer = PhaseTimer(enabled=False)  # tools/bench.py switches it on
        self.dropping = False  # a micro-batch of the current optimizer step was non-finite: drop the step

    # ------------------------------------------------------------------------------------------ set-up
    def _vae_dtype(self, comps) -> torch.dtype:
        choice = self.recipe.model.vae_dtype
        if choice != "auto":
            return DTYPES[choice]
        return torch.float32 if comps.family.vae_fp16_unsafe else self.dtype

    def _ensure_class_images(self) -> None:
        """DreamBooth: generate the missing class images with the untouched base (main process first)."""
        from finetune.data.prior import ensure_class_images

        with self.acc.main_process_first():
            ensure_class_images(self.recipe, self.comps, self.acc)

    def _resolve_text_cache(self) -> None:
        """`data.cache_text: auto`: cache where the family's encoders are large and captions never change."""
        d = self.recipe.data
        if d.cache_text == "auto":
            varies = any(d.caption_rules(src).varies for src in d.sources)
            d.cache_text = bool(self.comps.family.cache_text_by_default and not self.method.config.trains_text_encoder()
                                and not varies and not hasattr(self.method, "prepare_captions"))

    def _release_text_encoders(self) -> dict | None:
        """With every caption cached and no encoder trained, the encoders are only needed for the validation
        prompts: encode those once, then move the encoders to the CPU so training holds only the denoiser.
        Returns {prompt: embeddings} (None when the encoders stay)."""
        if not (self.recipe.data.cache_text is True and self.comps.family.cache_text_by_default):
            return None
        v = self.recipe.validation
        prompts = list(dict.fromkeys([*v.prompts, v.negative_prompt]))
        cache = {p: self.encode_text_frozen([p]) for p in prompts} if prompts else {}
        for enc in self.comps.text_encoders:
            enc.to("cpu")
        return cache

    def _build_data(self, vae_dtype):
        from finetune.data import build_train_data

        comps, acc = self.comps, self.acc
        key = f"{comps.source}|{type(comps.vae).__name__}|{vae_dtype}|{dict(comps.vae.config)}"
        text_key = f"{comps.source}|{comps.family.name}|{[t.name_or_path for t in comps.tokenizers]}"
        # the main process fills the caches first; the others then read its files instead of re-encoding
        with acc.main_process_first():
            return build_train_data(
                self.recipe, num_replicas=acc.num_processes, rank=acc.process_index,
                latent_encoder=self.encode_latents, latent_key=key,
                text_encoder=self.encode_text_frozen, text_key=text_key,
                show_progress=acc.is_main_process and self.recipe.logging.progress,
            )

    def _build_optimization(self, groups) -> None:
        from diffusers.training_utils import EMAModel

        from finetune.train.optim import build_lr_scheduler, build_optimizer

        acc = self.acc
        modules = self.comps.named_modules()
        self.trained_names = self.method.trained_modules()
        optimizer = build_optimizer(groups, self.cfg)
        scheduler = build_lr_scheduler(optimizer, self.cfg)
        # accelerate writes optimizer/scheduler/RNG; trained weights we save ourselves (trainable only)
        acc.register_save_state_pre_hook(lambda models, weights, out: weights.clear())
        acc.register_load_state_pre_hook(lambda models, inp: models.clear())
        prepared = acc.prepare(*[modules[n] for n in self.trained_names], optimizer, scheduler)
        self.wrapped = dict(zip(self.trained_names, prepared[: len(self.trained_names)], strict=True))
        self.optimizer, self.lr_scheduler = prepared[-2], prepared[-1]
        self.params = ckpt.trainable_params({n: acc.unwrap_model(m) for n, m in self.wrapped.items()})
        self.ema = None
        if self.cfg.ema.enabled:
            self.ema = EMAModel(list(self.params.values()), decay=self.cfg.ema.decay, foreach=True)
            self.ema.to(acc.device)

    # ------------------------------------------------------------------------------------- encoders
    @torch.no_grad()
    def encode_latents(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents (the distribution's mean: deterministic, cache-friendly)."""
        vae = self.comps.vae
        latents = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = (latents.float() - shift) * vae.config.scaling_factor
        if not torch.isfinite(latents).all():
            raise NonFiniteError(
                "the VAE produced non-finite latents (fp16 overflow?); set model.vae_dtype: fp32"
            )
        return latents

    @torch.no_grad()
    def encode_text_frozen(self, captions: list[str]) -> dict[str, torch.Tensor]:
        return {k: v.float().cpu() for k, v in self.encode_text(captions).items()}

    def encode_text(self, captions: list[str], keys: list[int] | None = None) -> dict[str, torch.Tensor]:
        # a method may rewrite captions first (Textual Inversion expands '<tok>' into its vectors and fills
        # empty captions from templates, drawn with each example's key)
        prepare = getattr(self.method, "prepare_captions", None)
        captions = prepare(captions, keys) if prepare else captions
        wrapped = getattr(self, "wrapped", {})  # data.cache_text encodes before accelerate wraps anything
        encoders = [wrapped.get(n, e) for n, e in zip(self.comps.text_encoder_names,
                                                       self.comps.text_encoders, strict=True)]
        comps = self.comps
        view = comps if encoders == comps.text_encoders else _with_encoders(comps, encoders)
        return comps.family.encode_prompt(view, captions, self.acc.device)

    # ---------------------------------------------------------------------------------------- a step
    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        comps, acc, cfg = self.comps, self.acc, self.cfg
        timer = self.timer
        with timer("vae_encode"):
            if "latents" in batch:
                latents = batch["latents"].to(acc.device, torch.float32)
            else:
                latents = self.encode_latents(batch["pixel_values"])
        # each example's random stream, keyed by where the planner put it in the step's global batch: the
        # same however the step is split into micro-batches and processes
        keys = example_keys(cfg.seed, self.state.step, batch["positions"], self.data.examples_per_step)
        with timer("text_encode"):
            text = batch.get("text") or self.encode_text(batch["captions"], keys)
            text = {k: v.to(acc.device) for k, v in text.items()}
        example = self.objective.example(latents, [example_generator(k) for k in keys])
        denoiser = self.wrapped.get(comps.denoiser_name, comps.denoiser)
        if self.recipe.model.guidance is not None:  # guidance-distilled denoisers (FLUX [dev]) take a value
            batch = {**batch, "guidance": self.recipe.model.guidance}
        with timer("denoiser_forward"), acc.autocast():
            pred = comps.family.predict(denoiser, example.noisy, example.timesteps, text, batch)
        target = example.target
        if "preserve" in batch and bool(batch["preserve"].any()):  # data.preservation: the base's prediction
            with timer("base_forward"):
                target = base_targets(self, example, text, batch, keys)
        return training_loss(self, pred, target, example, batch)

    def _all_agree(self, flag: bool) -> bool:
        """True on every process when any process says True (keeps DDP processes in lock-step)."""
        if self.acc.num_processes == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.acc.device)
        return bool(self.acc.reduce(t, reduction="sum").item() > 0)

    def train_step(self, batch) -> tuple[bool, dict[str, Any]]:
        """One micro-batch; returns (an optimizer step happened, logs)."""
        acc, cfg = self.acc, self.cfg
        self.comps.extras["step"] = self.state.step  # steps done before this one: methods with phases read it
        logs: dict[str, Any] = {}
        with acc.accumulate(*self.wrapped.values()):
            if not self.dropping:  # after a non-finite micro-batch the rest of its step is not computed
                loss, logs = self.compute_loss(batch)
                if self._all_agree(not torch.isfinite(loss).item()):
                    self._non_finite("loss", batch, float(loss.detach()))
                    self.dropping = True
                else:
                    with self.timer("backward"):
                        acc.backward(loss)
            if not acc.sync_gradients:
                return False, logs
            if self.dropping:  # the whole step goes: applying the other micro-batches would be a (k-1)/k step
                self.dropping = False
                self.optimizer.zero_grad(set_to_none=True)
                return False, logs
            stepped, norm = self._optimizer_step(batch)
        if not stepped:
            return False, logs
        self.method.after_step(self.comps)
        if self.ema is not None and (self.state.step + 1) % cfg.ema.update_every == 0:
            self.ema.step(list(self.params.values()))
        logs["grad_norm"] = norm
        if acc.scaler is not None:
            logs["loss_scale"] = acc.scaler.get_scale()
        return True, logs

    def _optimizer_step(self, batch) -> tuple[bool, float]:
        """Clip and step; (False, norm) when non-finite gradients skip the batch (bf16 / fp32).

        Under fp16 an inf gradient is the loss scaler's normal signal that the scale is too high: the
        GradScaler inside accelerate's optimizer skips that update and lowers the scale, the step still
        counts, and the learning-rate schedule does not advance (accelerate's optimizer_step_was_skipped).
        """
        self._rest_groups()
        norm = self._grad_norm()
        if not math.isfinite(norm) and self.acc.scaler is None:
            self._non_finite("gradient norm", batch, norm)
            self.optimizer.zero_grad(set_to_none=True)
            return False, norm
        with self.timer("optimizer"):
            self.optimizer.step()
            if not self.acc.optimizer_step_was_skipped:
                self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return True, norm

    def _rest_groups(self) -> None:
        """A parameter group outside its `active_steps` window (e.g. pivotal's phases) gets no gradient: no
        update, no weight decay, no optimizer moments, no share of the clipped norm."""
        step = self.state.step
        for group in self.optimizer.param_groups:
            first, stop = group.get("active_steps") or (0, None)
            if step < first or (stop is not None and step >= stop):
                for p in group["params"]:
                    p.grad = None

    def _grad_norm(self) -> float:
        params = list(self.params.values())
        if self.cfg.max_grad_norm:
            return float(self.acc.clip_grad_norm_(params, self.cfg.max_grad_norm))
        self.acc.unscale_gradients()  # fp16: the norm of the true gradients, not of the scaled ones
        grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    def _non_finite(self, what: str, batch, value: float) -> None:
        self.state.nan_skips += 1
        files = ", ".join(batch.get("paths", [])[:4])
        where = f"step {self.state.step + 1}: non-finite {what} ({value}) on a batch of {files}"
        if self.cfg.on_nan == "stop" or self.state.nan_skips > self.cfg.max_nan_skips:
            last = ckpt.complete_checkpoints(ckpt.checkpoint_root(self.out))
            kept = f"last good checkpoint: {last[-1]}" if last else "no checkpoint was written yet"
            hint = ("lower train.lr, check those images, or set train.on_nan: skip"
                    if self.cfg.on_nan == "stop" else f"more than {self.cfg.max_nan_skips} batches skipped")
            raise NonFiniteError(f"{where}; stopped, nothing exported ({kept}); {hint}")
        if self.acc.is_main_process:
            self.progress.write(f"warning: {where}; optimizer step skipped ({self.state.nan_skips} so far)")

    # ------------------------------------------------------------------------------------- the loop
    def run(self) -> None:
        from finetune.train.loop import run_loop

        run_loop(self)


def _with_encoders(comps, encoders):
    from dataclasses import replace

    return replace(comps, text_encoders=list(encoders))


def nonfinite_state(params: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in params.items() if not torch.isfinite(v).all()]
