"""The training loop. Read it top to bottom: `train()` sets up, `Trainer.run()` loops, `finish()` exports.

The method decides what trains (finetune/methods); the family how prompts become conditioning and a batch
the denoiser's inputs (finetune/models/families); the objective how a clean latent becomes a noisy example
and its target (finetune/train/objectives.py); the data pipeline what a batch is (finetune/data). The loop
only does the step, and keeps the run safe: checkpoints, clean interrupts, non-finite guards.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from finetune.errors import NonFiniteError, RunError
from finetune.recipe import Recipe
from finetune.train import checkpoint as ckpt
from finetune.train.loss import example_generator, example_keys
from finetune.train.objectives import build_objective
from finetune.train.preserve import base_predictions, base_rows, training_loss
from finetune.train.setup import DTYPES, StopFlag, prepare_denoisers, resume_fingerprint, scan_first
from finetune.train.sync import StepWatch
from finetune.train.timing import PhaseTimer

VAE_NON_FINITE = "the VAE produced non-finite latents (fp16 overflow?); set model.vae_dtype: fp32"


def train(recipe: Recipe) -> Path:
    """Run the recipe end to end; returns the output folder."""
    from finetune.train.setup import check_output_dir, make_accelerator, quiet_libraries

    check_output_dir(recipe)
    quiet_libraries()
    acc = make_accelerator(recipe)
    trainer = Trainer(recipe, acc)  # base and data load first: a mistake there leaves no run folder behind
    trainer.run()  # writes the run files once the resume decision is taken: a refused resume changes nothing
    return Path(recipe.train.output_dir)


class Trainer:
    def __init__(self, recipe: Recipe, acc):
        from accelerate.utils import set_seed

        from finetune.models.components import cast_frozen, load_components
        from finetune.recipe import complete_base
        from finetune.routes import recipe_warnings
        from finetune.train.edits import validation_pairs
        from finetune.train.target import attach_training_adapter, load_target

        self.recipe, self.acc, self.cfg = recipe, acc, recipe.train
        self.out = Path(self.cfg.output_dir)
        self.t_start = time.perf_counter()
        set_seed(self.cfg.seed)
        self.scan = scan_first(recipe, acc)  # bad data is one line before any model loads
        self.dtype = DTYPES[self.cfg.mixed_precision]
        from finetune.models.attention import check_device

        check_device(recipe.model.attention, acc.device)  # before loading anything
        complete_base(recipe)  # a family that shows only now (a hub id's configs just fetched): its rules run
        if acc.is_main_process:
            for line in recipe_warnings(recipe):
                print(f"warning: {line}", file=sys.stderr)
        comps = load_components(recipe.base, recipe.model.load_options(), self._precision())
        self.training_adapter = attach_training_adapter(recipe, comps)  # model.training_adapter (or None)
        self.method = recipe.method.build()
        groups = self.method.setup(comps, self.cfg.lr)
        vae_dtype = self._vae_dtype(comps.family)
        cast_frozen(comps, self.dtype, vae_dtype)
        self.target = load_target(recipe, comps, self._precision())  # validation.base (or None)
        self.objective = build_objective(comps.family, comps.scheduler, self.cfg)  # before the scheduler moves
        prepare_denoisers(comps, self.cfg)  # checkpointing, channels_last: each trained expert
        denoiser = comps.denoiser
        self.compile_watch = None  # train.compile (whole or per block): each trained expert
        for name in comps.trained_experts:
            self.compile_watch = self._compile(comps.experts[name], comps.family)
        self.router = None
        if self.cfg.routing is not None:  # TREAD: hooks on the window's blocks (train/routing.py)
            from finetune.train.routing import TokenRouter

            self.router = TokenRouter(denoiser, comps.family, self.cfg.routing, self.cfg.seed)
        device = acc.device
        comps.vae.to(device)
        for enc in [*comps.text_encoders, *comps.part_modules().values()]:
            enc.to(device)  # (quantized encoders are quantized on this move)
        self.comps, self.swap, self.swaps = comps, None, None
        if recipe.data.prior is not None:
            self._place_denoiser()  # class images are drawn with the whole pipeline
            self._ensure_class_images()
        self._resolve_text_cache()
        self.pair_inputs = validation_pairs(recipe)  # validation pairs' inputs, as training cuts them
        self.data = self._build_data(vae_dtype)
        self.prompt_cache = self._release_text_encoders()
        self.vae_released = self._release_vae()
        self._place_denoiser()  # after the caches, so encoders and denoiser need not share a small card
        self._build_optimization(groups)
        self.state = ckpt.TrainState(dataset_fingerprint=self.data.fingerprint,
                                     recipe_fingerprint=resume_fingerprint(recipe))
        self.stop = StopFlag()
        self.timer = PhaseTimer(enabled=False)  # tools/bench.py switches it on
        self.watch = StepWatch()  # what the host learns about a step, read once at its optimizer step
        self.stop_seen = False  # a stop request from any process, as of the last optimizer step

    # ------------------------------------------------------------------------------------------ set-up
    def _vae_dtype(self, family) -> torch.dtype:
        choice = self.recipe.model.vae_dtype
        if choice != "auto":
            return DTYPES[choice]
        return torch.float32 if family is None or family.vae_fp16_unsafe else self.dtype

    def _precision(self):
        """Load frozen parts straight in the compute dtype; what the method trains in place in fp32."""
        from finetune.models.components import LoadPrecision

        vae = self._vae_dtype(self.recipe.base.family)
        return LoadPrecision(self.dtype, vae, self.recipe.method.trains_in_place())

    def _compile(self, denoiser, family):
        """`train.compile`: the whole denoiser or each repeated block, in place (parameter names, so
        checkpoints and exports, stay the same); graphs per step are counted (train/compile.py)."""
        if not self.cfg.compile:
            return None
        from finetune.train.compile import CompileWatch, compile_denoiser

        compile_denoiser(denoiser, family, self.cfg.compile, dynamic=self.recipe.data.buckets.enabled)
        return CompileWatch()

    def _place_denoiser(self) -> None:
        """Move the denoiser to the device (nf4 / int8 layers are quantized on this move); with
        `train.block_swap` the last blocks' frozen weights stay on the CPU and stream in (models/offload.py)."""
        if self.swaps is not None:
            return
        self.swaps = {}
        for name, expert in self.comps.experts.items():  # every denoiser the base has (Wan 2.2: two experts)
            if self.cfg.block_swap:
                from finetune.models.offload import BlockSwap

                self.swaps[name] = BlockSwap(expert, self.comps.family, self.cfg.block_swap, self.acc.device)
            else:
                expert.to(self.acc.device)
        self.swap = self.swaps.get(self.comps.denoiser_name)

    def _release_vae(self) -> bool:
        """With every latent cached, the VAE only decodes validation grids: it waits on the CPU and
        `vae_on_device` lends it to the device for them."""
        if not self.recipe.data.cache_latents or self.acc.device.type == "cpu":
            return False
        self.comps.vae.to("cpu")
        return True

    @contextmanager
    def vae_on_device(self):
        if self.vae_released:
            self.comps.vae.to(self.acc.device)
        try:
            yield
        finally:
            if self.vae_released:
                self.comps.vae.to("cpu")

    def _ensure_class_images(self) -> None:
        """DreamBooth: generate the missing class images with the untouched base (main process first)."""
        from finetune.data.prior import ensure_class_images

        with self.acc.main_process_first():
            ensure_class_images(self.recipe, self.comps, self.acc)

    def _resolve_text_cache(self) -> None:
        """`data.cache_text: auto`: cache where the family's encoders are large and captions never change."""
        from finetune.train.setup import resolve_text_cache

        d = self.recipe.data
        if d.cache_text == "auto":
            d.cache_text = resolve_text_cache(self.recipe, self.comps.family, self.method)

    def _release_text_encoders(self) -> dict | None:
        """With every caption cached and no encoder trained, the encoders are only needed for the validation
        prompts: encode those once, then move the encoders to the CPU so training holds only the denoiser.
        Returns {prompt: embeddings} (None when the encoders stay)."""
        if not (self.recipe.data.cache_text is True and self.comps.family.cache_text_by_default):
            return None
        v = self.recipe.validation
        prompts = list(dict.fromkeys([*v.prompts, v.negative_prompt]))
        if self.comps.family.prompt_reads_conditions:  # the text encoder sees each pair's images
            from finetune.train.edits import pair_text

            cache = pair_text(self.encode_text_frozen, v.prompts, self.pair_inputs, v.negative_prompt)
        else:
            cache = {p: self.encode_text_frozen([p]) for p in prompts} if prompts else {}
        for enc in self.comps.text_encoders:
            enc.to("cpu")
        return cache

    def _build_data(self, vae_dtype):
        from finetune.data import build_train_data

        comps, acc = self.comps, self.acc
        key = f"{comps.source}|{type(comps.vae).__name__}|{vae_dtype}|{dict(comps.vae.config)}"
        text_key = f"{comps.source}|{comps.family.name}|{[t.name_or_path for t in comps.tokenizers]}"
        # every process encodes its share of the missing cache entries, then all read all of them
        return build_train_data(
            self.recipe, num_replicas=acc.num_processes, rank=acc.process_index,
            latent_encoder=self.encode_for_cache, latent_key=key,
            text_encoder=self.encode_text_frozen, text_key=text_key,
            show_progress=acc.is_main_process and self.recipe.logging.progress,
            barrier=acc.wait_for_everyone, scan=self.scan, text_reads_conditions=comps.family.prompt_reads_conditions,
        )

    def _build_optimization(self, groups) -> None:
        from diffusers.training_utils import EMAModel

        from finetune.train.distributed import check_sharding
        from finetune.train.optim import build_lr_scheduler, build_optimizer

        acc = self.acc
        modules = self.comps.named_modules()
        self.trained_names = self.method.trained_modules()
        self.set_training(True)
        check_sharding(acc, self.trained_names, self.cfg.ema.enabled)
        optimizer = build_optimizer(groups, self.cfg)
        scheduler = build_lr_scheduler(optimizer, self.cfg)
        # accelerate writes optimizer/scheduler/RNG; trained weights we save ourselves (trainable only)
        acc.register_save_state_pre_hook(lambda models, weights, out: weights.clear())
        acc.register_load_state_pre_hook(lambda models, inp: models.clear())
        # a block-swapped denoiser is placed already: accelerate must not move its CPU-held blocks to the device
        placement = [n not in self.swaps for n in self.trained_names]
        prepared = acc.prepare(*[modules[n] for n in self.trained_names], optimizer, scheduler,
                               device_placement=[*placement, True, True])
        self.wrapped = dict(zip(self.trained_names, prepared[: len(self.trained_names)], strict=True))
        self.optimizer, self.lr_scheduler = prepared[-2], prepared[-1]
        self.params = ckpt.trainable_params({n: acc.unwrap_model(m) for n, m in self.wrapped.items()})
        self.in_backward = self._in_backward()
        self.ema = None
        if self.cfg.ema.enabled:
            self.ema = EMAModel(list(self.params.values()), decay=self.cfg.ema.decay, foreach=True)
            self.ema.to(acc.device)

    def _in_backward(self):
        """`train.optimizer_in_backward`: each trained tensor steps from its gradient hook (train/in_backward.py)."""
        if not self.cfg.optimizer_in_backward:
            return None
        if self.acc.num_processes > 1:
            raise RunError("train.optimizer_in_backward runs on one process only (with several, a tensor would "
                           "step before its gradient is averaged); set it to false, or launch one process")
        from finetune.train.in_backward import StepInBackward

        return StepInBackward(self.optimizer.optimizer, list(self.params.values()))

    # ------------------------------------------------------------------------------------- encoders
    @torch.no_grad()
    def encode_latents(self, pixel_values: torch.Tensor, check: bool = True) -> torch.Tensor:
        """Images in [-1, 1] -> the family's normalised latents (the distribution's mode: cache-friendly).
        `check=False`: the caller has the step's one host read check them (a check here is a host sync)."""
        latents = self.comps.family.encode_latents(self.comps.vae, pixel_values)
        if check and not torch.isfinite(latents).all():
            raise NonFiniteError(VAE_NON_FINITE)
        return latents

    def reference_latents(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """The latents of each conditioning image of the batch ([B, C, h, w] each): cached, or encoded now."""
        if "references" in batch:
            return [c.to(self.acc.device, non_blocking=True).float() for c in batch["references"]]
        out = []
        for pixels in batch["reference_pixels"]:
            out.append(self.encode_latents(pixels, check=False))
            self.watch.note("latents", out[-1])
        return out

    @torch.no_grad()
    def encode_for_cache(self, pixel_values: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """What the latent cache keeps per entry: the latents, with the conditions the family derives from the
        same pixels (image-to-video's first frame) under 'cond.<name>'."""
        latents = self.encode_latents(pixel_values)
        conds = self.comps.family.encode_conditions(self.comps, pixel_values)
        return {"latents": latents, **{f"cond.{k}": v for k, v in conds.items()}} if conds else latents

    @torch.no_grad()
    def encode_text_frozen(self, captions: list[str], images: list[torch.Tensor] | None = None
                           ) -> dict[str, torch.Tensor]:
        return {k: v.float().cpu() for k, v in self.encode_text(captions, images=images).items()}

    def encode_text(self, captions: list[str], keys: list[int] | None = None,
                    images: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        # a method may rewrite captions first (Textual Inversion expands '<tok>' into its vectors and fills
        # empty captions from templates, drawn with each example's key)
        prepare = getattr(self.method, "prepare_captions", None)
        captions = prepare(captions, keys) if prepare else captions
        wrapped = getattr(self, "wrapped", {})  # data.cache_text encodes before accelerate wraps anything
        encoders = [wrapped.get(n, e) for n, e in zip(self.comps.text_encoder_names,
                                                       self.comps.text_encoders, strict=True)]
        comps = self.comps
        view = comps if encoders == comps.text_encoders else _with_encoders(comps, encoders)
        if images is not None and comps.family.prompt_reads_conditions:  # a vision-language encoder
            return comps.family.encode_conditioned_prompt(view, captions, images, self.acc.device)
        return comps.family.encode_prompt(view, captions, self.acc.device)

    # ---------------------------------------------------------------------------------------- a step
    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        comps, acc, cfg = self.comps, self.acc, self.cfg
        timer = self.timer
        with timer("vae_encode"):
            if "latents" in batch:  # the loader pins its batches on a GPU: copies need not stall the host
                latents = batch["latents"].to(acc.device, non_blocking=True).float()
                conds = {k: v.to(acc.device, non_blocking=True) for k, v in batch.get("conditions", {}).items()}
            else:
                latents = self.encode_latents(batch["pixel_values"], check=False)
                conds = comps.family.encode_conditions(comps, batch["pixel_values"])
                self.watch.note("latents", latents)
        # each example's random stream, keyed by where the planner put it in the step's global batch: the
        # same however the step is split into micro-batches and processes
        keys = example_keys(cfg.seed, self.state.step, batch["positions"], self.data.examples_per_step)
        with timer("text_encode"):
            text = batch.get("text") or self.encode_text(batch["captions"], keys, batch.get("reference_pixels"))
            text = {k: v.to(acc.device, non_blocking=True) for k, v in text.items()}
        if "references" in batch or "reference_pixels" in batch:  # paired data: the family appends them
            with timer("vae_encode"):
                batch = {**batch, "references": self.reference_latents(batch)}
        # a base with experts (Wan 2.2): the step's expert, on timesteps of its own range only
        expert, t_range = comps.expert_at(self.state.step)
        example = self.objective.example(latents, [example_generator(k) for k in keys], t_range)
        denoiser = self.wrapped.get(expert, comps.experts[expert])
        batch = {**batch, "conditions": conds}  # what the family derived from the target (image-to-video)
        if self.recipe.model.guidance is not None:  # guidance-distilled denoisers (FLUX [dev]) take a value
            batch = {**batch, "guidance": self.recipe.model.guidance}
        routing = self.router.routing(self.state.step) if self.router is not None else nullcontext()
        with timer("denoiser_forward"), acc.autocast(), routing:
            pred = comps.family.predict(denoiser, example.noisy, example.timesteps, text, batch)
        target, base = example.target, None
        need = base_rows(self, batch)  # data.preservation, masks toward the base (host tensors: no sync)
        if any(need):
            with timer("base_forward"):
                base = base_predictions(self, example, text, batch, keys, need)
            if "preserve" in batch and any(batch["preserve"].tolist()):
                keep = batch["preserve"].to(base.device).view(-1, *([1] * (base.ndim - 1)))
                target = torch.where(keep, base, target)
        return training_loss(self, pred, target, example, batch, base)

    def should_stop(self) -> bool:
        """A stop was asked for (on any process: the request rides the step's one read, see sync.py)."""
        return self.stop.requested if self.acc.num_processes == 1 else self.stop_seen

    def train_step(self, batch) -> tuple[bool, dict[str, Any]]:
        """One micro-batch; returns (an optimizer step happened, logs: host floats when it did)."""
        acc, cfg = self.acc, self.cfg
        self.comps.extras["step"] = self.state.step  # steps done before this one: methods with phases read it
        if self.compile_watch is not None:
            self.compile_watch.before_step()
        with acc.accumulate(*self.wrapped.values()):
            loss, logs = self.compute_loss(batch)
            # finiteness is read once per optimizer step, not per micro-batch: a non-finite loss is still
            # back-propagated (its gradients are non-finite too) and the whole step is dropped below
            self.watch.note("loss", loss)
            self.watch.note_batch(batch)
            if self.in_backward is not None:  # the last micro-batch's backward steps each tensor as it goes
                self.in_backward.arm(acc.sync_gradients, self._resting())
            with self.timer("backward"):
                acc.backward(loss)
            if not acc.sync_gradients:
                return False, logs
            stepped, logs = self._optimizer_step(logs)
        if self.compile_watch is not None:
            self.compile_watch.after_step()
        if not stepped:
            return False, logs
        self.method.after_step(self.comps)
        if self.ema is not None and (self.state.step + 1) % cfg.ema.update_every == 0:
            self.ema.step(list(self.params.values()))
        return True, logs

    def _optimizer_step(self, logs) -> tuple[bool, dict[str, float]]:
        """Clip, read the step's facts once, then step; False when a non-finite loss or (bf16 / fp32)
        gradient drops the step whole (applying the other micro-batches would be a (k-1)/k step).

        Under fp16 an inf gradient is the loss scaler's normal signal that the scale is too high: the
        GradScaler inside accelerate's optimizer skips that update and lowers the scale, the step still
        counts, and the learning-rate schedule does not advance (accelerate's optimizer_step_was_skipped).
        """
        in_backward = self.in_backward is not None  # then the tensors stepped already, in the backward
        if not in_backward:
            self._rest_groups()
        norm = self.in_backward.norm(self.acc.device) if in_backward else self._grad_norm()
        report = self.watch.read(self.acc, norm, logs, self.stop.requested)
        self.stop_seen = report.stop
        logs = report.logs | {"grad_norm": report.norm}
        if report.bad["latents"]:
            raise NonFiniteError(VAE_NON_FINITE)
        problem = report.problem(scaler=self.acc.scaler is not None)
        if problem is not None:
            self._non_finite(*problem, report.paths)
            self.optimizer.zero_grad(set_to_none=True)
            if self.acc.scaler is not None:  # its unscale_ of this step must be closed (lowers the scale)
                self.acc.scaler.update()
            return False, logs
        with self.timer("optimizer"):
            if not in_backward:
                self.optimizer.step()
            if not self.acc.optimizer_step_was_skipped:
                self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return True, logs

    def _resting(self) -> set[int]:
        """Ids of the tensors whose parameter group is outside its `active_steps` window this step."""
        step = self.state.step
        return {id(p) for group in self.optimizer.param_groups
                if not _active(group.get("active_steps"), step) for p in group["params"]}

    def _rest_groups(self) -> None:
        """A parameter group outside its `active_steps` window (e.g. pivotal's phases) gets no gradient: no
        update, no weight decay, no optimizer moments, no share of the clipped norm."""
        for group in self.optimizer.param_groups:
            if not _active(group.get("active_steps"), self.state.step):
                for p in group["params"]:
                    p.grad = None

    def _grad_norm(self) -> torch.Tensor:
        """The total gradient norm, left on the device (StepWatch reads it with the rest of the step)."""
        params = list(self.params.values())
        if self.cfg.max_grad_norm:
            return self.acc.clip_grad_norm_(params, self.cfg.max_grad_norm)
        self.acc.unscale_gradients()  # fp16: the norm of the true gradients, not of the scaled ones
        grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
        return torch.stack(grads).norm() if grads else torch.zeros((), device=self.acc.device)

    def _non_finite(self, what: str, value: float, paths: list[str]) -> None:
        self.state.nan_skips += 1
        files = ", ".join(paths[:4])
        where = f"step {self.state.step + 1}: non-finite {what} ({value}) in the batch of {files}"
        if self.cfg.on_nan == "stop" or self.state.nan_skips > self.cfg.max_nan_skips:
            last = ckpt.complete_checkpoints(ckpt.checkpoint_root(self.out))
            kept = f"last good checkpoint: {last[-1]}" if last else "no checkpoint was written yet"
            hint = ("lower train.lr, check those images, or set train.on_nan: skip"
                    if self.cfg.on_nan == "stop" else f"more than {self.cfg.max_nan_skips} batches skipped")
            raise NonFiniteError(f"{where}; stopped, nothing exported ({kept}); {hint}")
        if self.acc.is_main_process:
            self.progress.write(f"warning: {where}; optimizer step skipped ({self.state.nan_skips} so far)")

    def set_training(self, on: bool) -> None:
        """The trained modules in training mode for the steps (dropout acts), in eval mode after the last."""
        modules = self.comps.named_modules()
        for name in self.trained_names:
            training_mode(modules[name], adapters_only=self.method.config.switchable_adapters(), on=on)
        self.training = on

    # ------------------------------------------------------------------------------------- the loop
    def run(self) -> None:
        from finetune.train.loop import run_loop

        run_loop(self)


def training_mode(module: torch.nn.Module, adapters_only: bool, on: bool = True) -> None:
    """Put a trained module in training mode (freeze() left everything in eval, where dropout does nothing: a
    recipe's method.dropout would be silently ignored), or back in eval (`on=False`). For adapters
    (`adapters_only`) only the peft adapter layers switch: the frozen base keeps its own dropout off (T5's,
    including its functional attention dropout), so the base under the adapters is the base preservation
    compares with. A method that trains the module's own weights trains it as the module's authors did."""
    if not adapters_only:
        module.train(on)
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    for sub in module.modules():
        if isinstance(sub, BaseTunerLayer):  # LoRA's lora_dropout, LoHa/LoKr's rank and module dropout
            sub.training = on  # the layer itself and its adapter parts, never the wrapped base layer (a
            for name, child in sub.named_children():  # bitsandbytes 4-bit layer in eval repacks its weights)
                if name != "base_layer":
                    child.train(on)


def _active(window: tuple[int, int | None] | None, step: int) -> bool:
    first, stop = window or (0, None)
    return first <= step and (stop is None or step < stop)


def _with_encoders(comps, encoders):
    from dataclasses import replace

    return replace(comps, text_encoders=list(encoders))
