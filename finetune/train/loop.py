"""The outer loop: resume, epochs, logging, checkpoints, validation grids, interrupts, and the export."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from finetune.errors import NonFiniteError, RunError, UserError
from finetune.eval.run import RunMetrics
from finetune.train import checkpoint as ckpt
from finetune.train.distributed import describe, is_sharded, unshard_for_export
from finetune.train.setup import flat_config, write_run_files
from finetune.train.tracking import LossLog, Progress, plot_loss


def run_loop(t) -> None:
    """`t` is a finetune.train.trainer.Trainer, fully set up."""
    acc, cfg, recipe = t.acc, t.cfg, t.recipe
    resumed = _maybe_resume(t)
    main = acc.is_main_process
    if main:
        write_run_files(recipe)  # only now: a refused resume must leave the run's recipe.yaml as it was
    if main and recipe.logging.report_to:
        acc.init_trackers(recipe.logging.project, config=flat_config(recipe.resolved()))
    t.progress = Progress(cfg.max_steps, t.state.step, main and recipe.logging.progress)
    t.loss_log = LossLog(t.out / "logs" / "loss.csv", t.state.step if resumed else None) if main else None
    t.run_metrics = (RunMetrics(recipe, t.out, acc.device, t.dtype, t.state.step if resumed else None)
                     if main and recipe.validation.metrics else None)
    if main:
        t.progress.write(_banner(t))
    if not resumed and recipe.validation.at_start and recipe.validation.prompts:
        validate(t, step=0)
    t.stop.install()
    try:
        finished = _epochs(t)
    finally:
        t.set_training(False)  # the trained modules leave the loop in eval mode: exports, final grid, callers
        t.stop.restore()
        t.progress.close()
        t.data.close()  # the persistent loader workers are not needed past the last step
    if not finished:
        _interrupted(t)
        return
    finish(t)


def _banner(t) -> str:
    d = t.data
    trainable = sum(p.numel() for p in t.params.values())
    return (
        f"finetune: {t.recipe.method.name} on {t.comps.base.name} ({t.comps.family.name}, {t.objective.describe()}); "
        f"{trainable:,} trained parameters; {d.num_images} images, {d.batches_per_epoch} batches/epoch/process; "
        f"{describe(t.acc)} on {t.acc.device}; first step after "
        f"{time.perf_counter() - t.t_start:.1f}s of set-up"
    )


def _maybe_resume(t) -> bool:
    cfg = t.cfg
    if not cfg.resume:
        return False
    path = ckpt.find_resume(t.out, cfg.resume)
    if path is None:
        if t.acc.is_main_process:
            print(f"train.resume: no complete checkpoint in {ckpt.checkpoint_root(t.out)}; starting from step 0")
        return False
    saved = ckpt.load_checkpoint(t.acc, path, t.params, t.ema)
    changed = []
    if saved.recipe_fingerprint != t.state.recipe_fingerprint:
        changed.append("the recipe (training settings)")
    if saved.dataset_fingerprint != t.state.dataset_fingerprint:
        changed.append("the dataset (images, captions or repeats)")
    if changed and not cfg.resume_force:
        raise UserError(
            f"cannot resume from {path}: {' and '.join(changed)} changed since it was written; "
            "restore them, or set train.resume_force=true to continue anyway"
        )
    saved.recipe_fingerprint, saved.dataset_fingerprint = t.state.recipe_fingerprint, t.state.dataset_fingerprint
    t.state = saved
    if t.acc.is_main_process:
        print(f"resumed from {path} at step {saved.step} (epoch {saved.epoch}, batch {saved.batch_in_epoch})")
    return True


def _epochs(t) -> bool:
    """Train until max_steps; False when interrupted by a signal."""
    cfg, state = t.cfg, t.state
    while state.step < cfg.max_steps:
        waited = time.perf_counter()
        for batch in t.data.loader(state.epoch, start_batch=state.batch_in_epoch):
            t.timer.add("data", time.perf_counter() - waited)
            stepped, logs = t.train_step(batch)
            state.batch_in_epoch += 1
            if stepped:
                state.step += 1
                with t.timer("logging_validation"):
                    _after_step(t, logs)
                if t.should_stop() or state.step >= cfg.max_steps:
                    break
            waited = time.perf_counter()
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
            continue
        if state.step < cfg.max_steps:  # left the epoch early: a stop was requested
            return False
    return True


def _after_step(t, logs) -> None:
    cfg, step, acc = t.cfg, t.state.step, t.acc
    watch = t.compile_watch
    if acc.is_main_process and watch is not None and len(watch.per_step) > 2 and watch.per_step[-1]:
        t.progress.write(f"compile: {watch.per_step[-1]} graphs recompiled at step {step} (a shape or setting that "
                         "changes between steps; TORCH_LOGS=recompiles says which)")
    if acc.is_main_process:  # logs are host floats already: the step's one read brought them (train/sync.py)
        loss = logs["loss"]
        lr = t.lr_scheduler.get_last_lr()[0]
        t.progress.update(loss, lr)
        t.loss_log.add(step, loss, lr)  # every step: the plot wants them all, and a CSV row is cheap
        if step % t.recipe.logging.every == 0 or step == cfg.max_steps:
            scalars = {**logs, "lr": lr}
            if acc.scaler is not None:  # fp16: a read of its own, so on logging steps only
                scalars["loss_scale"] = acc.scaler.get_scale()
            if t.recipe.logging.report_to:
                acc.log(scalars, step=step)
    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
        save(t)
    every = t.recipe.validation.every
    if every and step % every == 0 and step < cfg.max_steps and t.recipe.validation.prompts:
        validate(t, step)


def save(t) -> Path:
    root = ckpt.checkpoint_root(t.out)
    try:
        path = ckpt.save_checkpoint(t.acc, root, t.state, t.params, t.ema, t.cfg.keep_last)
    except OSError as e:
        done = ckpt.complete_checkpoints(root)
        kept = f"the previous checkpoint {done[-1]} is intact" if done else "no earlier checkpoint exists"
        raise RunError(f"could not write the step-{t.state.step} checkpoint in {root} ({e}); {kept}") from None
    if t.acc.is_main_process:
        t.progress.write(f"checkpoint: {path}")
    return path


def _interrupted(t) -> None:
    path = save(t)
    if t.acc.is_main_process:
        print(
            f"stopped by {t.stop.signal_name or 'request'} at step {t.state.step}/{t.cfg.max_steps}; "
            f"checkpoint saved to {path}\nresume with: {resume_command(t.out, t.acc.num_processes)}"
        )
    t.acc.end_training()


def resume_command(out: Path, processes: int = 1) -> str:
    """The command that continues this run: its folder's recipe.yaml holds every override it was started with."""
    import shlex

    folder = shlex.quote(str(out))
    if processes > 1:
        return f"accelerate launch finetune/run.py --resume {folder} (with this run's launch options)"
    return f"python -m finetune --resume {folder}"


@torch.no_grad()
def validate(t, step: int) -> Path | None:
    """Render the validation grid on the main process (the others wait); with validation.training_adapter: both,
    a second grid with model.training_adapter applied."""
    from finetune.train.validation import edit_grid, grid, render_rows, save_grid

    acc, v = t.acc, t.recipe.validation
    path = rows = extra = None
    # a sharded denoiser gathers its weights inside forward: every process renders, the main one saves
    if acc.is_main_process or is_sharded(acc):
        shown = acc.is_main_process and t.recipe.logging.progress
        clip = {"frames": clip_frames(t), "image": start_image(t)}  # video families: clips from a first frame
        rows = render_rows(t, training_adapter=v.training_adapter == "on",
                           progress=f"grid at step {step}:" if shown else None, **clip)
        extra = render_rows(t, training_adapter=True, progress=f"grid at step {step}, with the training adapter:"
                            if shown else None, **clip) if v.training_adapter == "both" else None
    if acc.is_main_process:
        image = (edit_grid(t.pair_inputs, rows, v.prompts, title=f"step {step}") if v.images else
                 grid(rows, v.prompts, title=f"step {step}"))
        path = save_grid(image, t.out / "samples", step)
        if clip_frames(t):
            save_clips(t, rows, path)
        if extra is not None:
            save_grid(grid(extra, v.prompts, title=f"step {step}, with the training adapter"), t.out / "samples",
                      step, "_with_adapter")
        _log_image(t, image, step)
        if v.score_subject:
            _score(t, rows, step)
        if v.score_clips:
            _score_clips(t, rows, step)
        t.last_grid = path
        if getattr(t, "run_metrics", None) is not None:
            _metrics(t, rows, step)
    acc.wait_for_everyone()
    return path


def clip_frames(t) -> int | None:
    """Frames per validation clip for a video family (None: images)."""
    if not t.comps.family.video:
        return None
    d = t.recipe.data.video
    return t.recipe.validation.frames or (d.frames if d is not None else 1)


def start_image(t):
    """Image-to-video families: the first frame of the first training example, as a PIL image (else None)."""
    if not t.comps.family.start_image:
        return None
    from PIL import Image

    ex = t.data.plan(0)[0][0]
    px, _, _ = t.data.render.pixels(ex.record, ex.bucket)
    first = px[:, 0] if px.ndim == 4 else px
    return Image.fromarray(((first + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy())


def save_clips(t, rows, grid_path: Path) -> None:
    """Beside a video run's frame-strip grid: an animated GIF of every sample (prompts down, seeds across) and
    an MP4 of each prompt's first seed."""
    from finetune.eval.video import save_gif, save_mp4

    v, d = t.recipe.validation, t.recipe.data.video
    fps = round(v.fps or (d.fps if d is not None and d.fps else 16))
    save_gif(rows, grid_path.with_suffix(".gif"), fps)
    for i, row in enumerate(rows):
        save_mp4(row[0], grid_path.with_name(f"{grid_path.stem}-prompt{i}.mp4"), fps)


def _score(t, rows, step: int) -> None:
    """Toy runs: how close each prompt's samples are to the held-out subject (mean over seeds), and for every
    world prompt ('a blue square') its colour / shape accuracy and pixel drift from the base's samples."""
    import json

    from finetune.export.io import write_text_atomic
    from finetune.toy.score import drift_scores, subject_similarity

    v = t.recipe.validation
    scores = {p: sum(subject_similarity(im, v.score_subject) for im in row) / len(row)
              for p, row in zip(v.prompts, rows, strict=True)}
    if step == 0:
        t.base_rows = rows  # fresh adapters leave the base's output unchanged: these are the base's samples
    drift = drift_scores(rows, _base_rows(t), v.prompts)
    scores |= drift
    n = len(v.seeds)
    t.progress.write(f"step {step}: {v.score_subject} similarity " +
                     ", ".join(f"'{p}' {scores[p]:.3f}" for p in v.prompts) + _drift_line(drift, n))
    path = t.out / "samples" / "scores.json"
    history = json.loads(path.read_text()) if path.is_file() else {}
    history[str(step)] = scores
    write_text_atomic(path, json.dumps(history, indent=2))
    if t.recipe.logging.report_to:
        t.acc.log({f"subject_similarity/{p}": scores[p] for p in v.prompts}, step=step)
        t.acc.log({f"drift/{k}": s for k, s in drift.items()}, step=step)


def _score_clips(t, rows, step: int) -> None:
    """Toy video runs: per prompt, the share of its clips whose colour, shape and motion all match it."""
    import json

    from finetune.export.io import write_text_atomic
    from finetune.toy.video_score import score_clip

    prompts = t.recipe.validation.prompts
    scores = {p: sum(score_clip(c, p)["all_ok"] for c in row) / len(row) for p, row in zip(prompts, rows, strict=True)}
    t.progress.write(f"step {step}: clips matching their prompt " + ", ".join(f"'{p}' {s:.2f}" for p, s in scores.items()))
    path = t.out / "samples" / "scores.json"
    history = json.loads(path.read_text()) if path.is_file() else {}
    history[str(step)] = scores
    write_text_atomic(path, json.dumps(history, indent=2))


def _drift_line(drift: dict[str, float], n: int) -> str:
    prompts = dict.fromkeys(k.split(" | ")[0] for k in drift)
    parts = []
    for p in prompts:
        bits = [f"{m} {round(drift[f'{p} | {m}'] * n)}/{n}" for m in ("colour", "shape") if f"{p} | {m}" in drift]
        if f"{p} | drift" in drift:
            bits.append(f"drift {drift[f'{p} | drift']:.3f}")
        parts.append(f"'{p}' " + " ".join(bits))
    return "; " + "; ".join(parts) if parts else ""


def _base_rows(t):
    """The base's validation samples: kept from step 0, or (a resumed run) rendered with the adapters off."""
    rows = getattr(t, "base_rows", None)
    if rows is not None or not t.method.config.switchable_adapters():
        return rows
    from finetune.train.validation import render_rows

    t.base_rows = render_rows(t, adapters=False, training_adapter=t.recipe.validation.training_adapter == "on",
                              progress="the base's grid (adapters off):" if t.recipe.logging.progress else None)
    return t.base_rows


def _metrics(t, rows, step: int) -> None:
    """DreamBench metrics of the grid (finetune/eval); train.keep_best exports the best step's weights."""
    from dataclasses import replace

    from finetune.export.context import ExportContext

    m = t.run_metrics
    scores = m.record(rows, step)
    t.progress.write(m.line(step, scores))
    if t.recipe.logging.report_to:
        t.acc.log(m.scalars(scores), step=step)
    if t.recipe.train.keep_best and m.best_step() == step and not nonfinite_state(t.params):
        ctx = ExportContext.from_trainer(t)
        ctx = replace(ctx, name=f"{ctx.name}-step-{step:06d}")
        folder = m.keep_best(step, lambda out: t.method.export(t.comps, out, ctx))
        t.progress.write(f"keep_best: step {step} is the best so far; its export is in {folder}")


def _log_image(t, image, step: int) -> None:
    import numpy as np

    if "tensorboard" in t.recipe.logging.report_to:
        tracker = t.acc.get_tracker("tensorboard", unwrap=True)
        tracker.add_image("samples", np.asarray(image), step, dataformats="HWC")
    if "wandb" in t.recipe.logging.report_to:
        import wandb

        t.acc.get_tracker("wandb", unwrap=True).log({"samples": wandb.Image(image)}, step=step)


def _check_in_sync(t) -> None:
    """Data-parallel processes must end with identical weights; a mismatch is a bug worth stopping on."""
    acc = t.acc
    if acc.num_processes == 1 or is_sharded(acc):  # shards differ by design; one copy exists
        return
    with torch.no_grad():
        mix = sum(float(p.double().sum()) * (i + 1) for i, p in enumerate(t.params.values()))
        sums = acc.gather(torch.tensor([mix], dtype=torch.float64, device=acc.device)).cpu()
    if not torch.all(sums == sums[0]):
        raise RuntimeError(f"processes ended with different weights (checksums {sums.tolist()})")
    if acc.is_main_process:
        t.progress.write(f"{acc.num_processes} processes hold identical weights (checksum {float(sums[0]):.10g})")


def finish(t) -> None:
    """Final grid, loss plot and export (main process), with a guard against exporting NaN weights."""
    acc = t.acc
    if t.ema is not None and t.recipe.export.use_ema:
        # every process, before the final grid: the grid and the model card show the weights exported
        t.ema.copy_to(list(t.params.values()))
    if t.recipe.validation.prompts:
        validate(t, t.state.step)
    _check_in_sync(t)
    # every process checks (a sharded tensor's check is a collective), so every process stops together
    bad = nonfinite_state(t.params)
    if bad:
        raise NonFiniteError(f"trained weights hold non-finite values ({bad[0]}); nothing exported")
    if is_sharded(acc):
        for name in t.wrapped:
            unshard_for_export(acc.unwrap_model(t.wrapped[name]))
    if acc.is_main_process:
        plot_loss(t.loss_log.read(), t.out / "loss.png")
        from finetune.export.context import ExportContext

        ctx = ExportContext.from_trainer(t)
        written = t.method.export(t.comps, t.out, ctx)
        for p in written:
            t.progress.write(f"wrote {p}")
        if t.compile_watch is not None:
            t.progress.write(t.compile_watch.line())
        print(f"done: {t.state.step} steps in {time.perf_counter() - t.t_start:.0f}s; outputs in {t.out}")
    acc.wait_for_everyone()
    acc.end_training()


def nonfinite_state(params: dict[str, torch.Tensor]) -> list[str]:
    """Names of the trained tensors holding NaN or inf."""
    return [k for k, v in params.items() if not torch.isfinite(v).all()]
