"""Everything the loop needs before its first step: accelerator, output folder, components, data, optimizer."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from finetune.errors import UserError
from finetune.recipe import Recipe, dump_recipe

DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RUN_FILES = ("recipe.yaml", "pytorch_lora_weights.safetensors")


def make_accelerator(recipe: Recipe):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    # a fresh state per run, so several runs can share one Python process (tests, notebooks)
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    out = Path(recipe.train.output_dir)
    try:
        acc = Accelerator(
            gradient_accumulation_steps=recipe.train.gradient_accumulation,
            mixed_precision=recipe.train.mixed_precision,
            log_with=list(recipe.logging.report_to) or None,
            project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
            step_scheduler_with_optimizer=False,  # we step the LR schedule once per optimizer step ourselves
            # applies when this creates the process group (a launched run), not to one already made
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=recipe.train.barrier_timeout))],
        )
    except (ValueError, RuntimeError) as e:
        raise UserError(
            f"train.mixed_precision: {recipe.train.mixed_precision!r} is not available here ({e}); "
            "use 'bf16' or 'no' on a CPU, 'fp16' or 'bf16' on a GPU"
        ) from None
    if recipe.train.mixed_precision == "fp16" and acc.scaler is None and acc.device.type == "cpu":
        # accelerate scales fp16 losses only on accelerators (elsewhere it silently computes in fp32 while
        # our frozen weights are fp16); torch autocasts fp16 on CPUs too, so give the CPU the GradScaler
        # an accelerator gets, before `prepare` hands it to the optimizer wrapper
        acc.scaler = torch.amp.GradScaler("cpu")
        acc.native_amp = True
    from finetune.train.distributed import promote_fsdp_on_cpu

    promote_fsdp_on_cpu(acc)
    return acc


def check_output_dir(recipe: Recipe) -> None:
    """Refuse to write over a finished or running run unless resuming or told to overwrite."""
    from finetune.export.context import export_targets

    out = Path(recipe.train.output_dir)
    for folder in (out, *out.parents):  # the first part that exists must be a folder we could write into
        if folder.exists():
            if not folder.is_dir():
                where = "is a file" if folder == out else f"is under the file '{folder}'"
                raise UserError(f"train.output_dir '{out}' {where}; choose a folder")
            break
    finished = out.is_dir() and any((out / name).exists() for name in (*RUN_FILES[1:], *export_targets(recipe)))
    if recipe.train.resume == "latest" and finished and not recipe.train.overwrite:
        from finetune.train.checkpoint import checkpoint_root, find_resume

        if find_resume(out, "latest") is None:  # resuming would retrain from step 0 over the finished export
            raise UserError(f"train.output_dir '{out}' holds a finished run and no checkpoint to resume from; "
                            "pick a new train.output_dir, or set train.overwrite=true to train it again from "
                            f"step 0 (no complete checkpoint in {checkpoint_root(out)})")
    if recipe.train.resume or recipe.train.overwrite or not out.is_dir():
        return
    if any((out / name).exists() for name in RUN_FILES) or (out / "checkpoints").is_dir():
        hint = ("continue it with train.resume=latest, " if not finished or (out / "checkpoints").is_dir()
                else "")
        raise UserError(
            f"train.output_dir '{out}' already holds a run; {hint}"
            "pick a new train.output_dir, or set train.overwrite=true"
        )
    clash = [name for name in export_targets(recipe) if (out / name).exists()]
    if clash:
        raise UserError(f"train.output_dir '{out}' holds '{clash[0]}', which the export would overwrite; "
                        "pick a new train.output_dir, or set train.overwrite=true")


def write_run_files(recipe: Recipe) -> None:
    import shutil

    from finetune.export.io import write_text_atomic

    out = Path(recipe.train.output_dir)
    if recipe.train.overwrite and not recipe.train.resume:
        # a fresh run in an old folder: drop the old run's checkpoints, grids and logs so nothing mixes
        for sub in ("checkpoints", "samples", "logs"):
            shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "recipe.yaml", dump_recipe(recipe))


def flat_config(data: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten the recipe for tracker hyper-parameters (scalars only)."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flat_config(v, f"{prefix}{k}."))
        return out
    if isinstance(data, bool | int | float | str):
        return {prefix[:-1]: data}
    return {prefix[:-1]: json.dumps(data)}


def resume_fingerprint(recipe: Recipe) -> str:
    """The recipe hash that must match on resume: what changes the training math, not how long or how
    often we sample, log or checkpoint."""
    import hashlib

    data = recipe.resolved()
    for key in ("resume", "resume_force", "max_steps", "overwrite", "checkpoint_every", "keep_last", "output_dir",
                "barrier_timeout"):
        data["train"].pop(key, None)
    for section in ("validation", "logging", "export"):
        data.pop(section, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class StopFlag:
    """SIGINT / SIGTERM ask the loop to finish the current step, checkpoint and exit cleanly."""

    requested: bool = False
    signal_name: str = ""
    _previous: dict[int, Any] = field(default_factory=dict)

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a notebook worker): leave default handling
                pass

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def quiet_libraries() -> None:
    """Keep the console for our progress bar: silence library info chatter and per-step warnings."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def resolve_text_cache(recipe: Recipe, family, method) -> bool:
    """`data.cache_text: auto` made concrete: cache where the family's encoders are large and captions never
    change (the trainer and `finetune estimate` ask the same question)."""
    d = recipe.data
    if d.cache_text != "auto":
        return bool(d.cache_text)
    varies = any(d.caption_rules(src).varies for src in d.sources)
    return bool(family.cache_text_by_default and not method.config.trains_text_encoder() and not varies
                and not hasattr(method, "prepare_captions"))


def scan_first(recipe, acc):
    """Every data source read and checked (videos probed) before the base loads: bad data is one line, fast.
    With prior preservation the class images may not exist yet (they are generated with the base): the data is
    scanned again then, and this returns None."""
    from finetune.data.scan import scan_data

    scan = scan_data(recipe.data, verbose=acc.is_main_process and recipe.logging.progress, need_prior=False)
    return scan if recipe.data.prior is None else None


def prepare_denoisers(comps, cfg) -> None:
    """`train.gradient_checkpointing` and `channels_last` on the denoiser, or on each trained expert (the trainer
    compiles them after: train/compile.py)."""
    import torch

    from finetune.models.offload import checkpoint_block

    for name in comps.trained_experts:
        denoiser = comps.experts[name]
        if cfg.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing(checkpoint_block)
        if cfg.channels_last:
            denoiser.to(memory_format=torch.channels_last)
