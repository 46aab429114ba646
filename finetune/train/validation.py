"""Sample grids: the recipe's validation prompts x fixed seeds, rendered with the current weights."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from finetune.sections import ValidationSection

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
}


def make_pipeline(comps, cfg: ValidationSection, denoiser=None, text_encoders=None, device=None, dtype=None):
    """The validation pipeline: the family's edit pipeline when validation has pairs (validation.images)."""
    import diffusers

    pipe = comps.pipeline(denoiser=denoiser, text_encoders=text_encoders, edit=bool(cfg.images))
    choice = comps.family.default_sampler if cfg.scheduler == "auto" else cfg.scheduler
    if choice == "base":
        pipe.scheduler = comps.extras.get("sampler", pipe.scheduler)
    else:
        cls = getattr(diffusers, SCHEDULERS[choice])
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if device is not None:
        pipe.to(device)
    return pipe


@torch.no_grad()
def render(pipe, prompts: list[str], seeds: list[int], cfg: ValidationSection, size: tuple[int, int], device,
           text: dict | None = None, family=None, max_sequence_length: int | None = None, frames: int | None = None,
           image: Image.Image | None = None, progress: str | None = None) -> list[list[Image.Image]]:
    """rows[p][s]: one image per prompt and seed (video families, `frames` given: one clip, a list of frames).
    Seeds are per image, so a grid is comparable across steps. `text` holds pre-encoded prompts ({prompt:
    embeddings}) when the text encoders were released; `max_sequence_length` the T5 length the run encodes
    captions at (pipelines default to their longest). `progress`: a label for the pipeline's own progress bar
    over each prompt's denoising steps (None: silent)."""
    width, height = size
    clip = {"num_frames": frames} if frames else {}
    if image is not None:  # image-to-video: every sample starts from this frame
        clip["image"] = image
    rows = []
    for i, prompt in enumerate(prompts):
        if progress is not None:  # sampling is minutes on a CPU: say what runs, as the pipeline counts its steps
            pipe.set_progress_bar_config(desc=f"{progress} sampling prompt {i + 1}/{len(prompts)} "
                                         f"x {len(seeds)} images", leave=False, file=sys.stderr, unit="step")
        gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        if text is not None:
            n = len(seeds)
            rep = {prompt: {k: v.repeat(n, *[1] * (v.ndim - 1)).to(device) for k, v in text[prompt].items()}}
            neg = {k: v.repeat(n, *[1] * (v.ndim - 1)).to(device) for k, v in text[cfg.negative_prompt].items()}
            words = family.pipeline_prompt_kwargs(rep[prompt], neg)
        else:
            words = {"prompt": [prompt] * len(seeds)}
            if cfg.negative_prompt:  # only when set: some pipelines take no negative prompt (FLUX.2 [klein])
                words["negative_prompt"] = [cfg.negative_prompt] * len(seeds)
            if max_sequence_length:
                words["max_sequence_length"] = max_sequence_length
        if family is None:
            guide = {"guidance_scale": 7.5 if cfg.guidance_scale is None else cfg.guidance_scale}
        else:  # None: the family's default, as its pipeline takes it
            guide = family.guidance_kwargs(pipe, cfg.guidance_scale)
        if "true_cfg_scale" in guide and text is None:  # true CFG runs only with a negative, even an empty one
            words["negative_prompt"] = [cfg.negative_prompt] * len(seeds)
        out = pipe(**words, **guide, **clip, num_inference_steps=cfg.steps, generator=gens,
                   width=width, height=height, output_type="pil")
        rows.append(list(out.frames) if frames else list(out.images))  # video pipelines return frames
    return rows


@torch.no_grad()
def render_rows(t, adapters: bool = True, training_adapter: bool = False, progress: str | None = None,
                frames: int | None = None, image: Image.Image | None = None) -> list[list[Image.Image]]:
    """The run's validation prompts x seeds as the grids show them, from the trainer `t`: with the trained
    adapters (or, `adapters=False`, without: the base's own samples), on validation.base when it is set (the
    adapters copied there first), and with model.training_adapter only when `training_adapter`. Sampling steps
    and guidance: the recipe's, else the sampling base's own (finetune/train/target.py); `progress`, `frames`, `image`: render's."""
    from contextlib import ExitStack

    from finetune.train.preserve import adapters_off
    from finetune.train.target import grid_settings

    acc, comps = t.acc, t.comps
    v = grid_settings(t, t.recipe.validation)
    name = comps.denoiser_name
    denoiser = acc.unwrap_model(t.wrapped[name]) if name in t.wrapped else comps.denoiser
    encoders = [acc.unwrap_model(t.wrapped[n]) if n in t.wrapped else e
                for n, e in zip(comps.text_encoder_names, comps.text_encoders, strict=True)]
    adapted = [comps.named_modules()[n] for n in t.trained_names]
    with ExitStack() as stack:
        if t.target is not None:
            t.target.sync(denoiser)
            comps, denoiser = t.target.view(comps), t.target.denoiser
            adapted = [denoiser, *(m for m in adapted if m is not t.comps.denoiser)]
            stack.enter_context(t.target.on_device(acc.device))
        if t.training_adapter is not None and not training_adapter:
            stack.enter_context(t.training_adapter.off())
        if not adapters:
            stack.enter_context(adapters_off(adapted))
        was = t.training
        t.set_training(False)  # samples without dropout
        stack.callback(t.set_training, was)
        pipe = make_pipeline(comps, v, denoiser=denoiser, text_encoders=encoders)
        res = t.recipe.data.resolution
        stack.enter_context(acc.autocast())
        stack.enter_context(t.vae_on_device())
        size, length = (v.width or res, v.height or res), comps.family.sequence_length(comps)
        if v.images:  # validation pairs: each prompt's inputs through the family's edit pipeline
            from finetune.train.edits import render_edits

            return render_edits(pipe, v.prompts, t.pair_inputs, v.seeds, v, size, acc.device, comps.family,
                                text=t.prompt_cache, max_sequence_length=length, progress=progress)
        return render(pipe, v.prompts, v.seeds, v, size, acc.device, text=t.prompt_cache, family=comps.family,
                      max_sequence_length=length, frames=frames, image=image, progress=progress)


def grid(rows: list[list[Image.Image]], labels: list[str], title: str = "") -> Image.Image:
    """A labelled grid: one row per prompt, one column per seed; the prompt is written above each row. Clips
    are shown as frame strips, one row per seed."""
    if isinstance(rows[0][0], list):
        from finetune.eval.video import strip_grid

        return strip_grid(dict(zip(labels, rows, strict=True)), title)
    w, h = rows[0][0].size
    label_h = 14
    top = label_h if title else 0
    cols = max(len(r) for r in rows)
    canvas = Image.new("RGB", (max(cols * w, 8 * len(title)), top + len(rows) * (h + label_h)), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((2, 1), title, fill="black")
    for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
        y = top + i * (h + label_h)
        draw.text((2, y + 1), label[: max(8, cols * w // 6)], fill="black")
        for j, img in enumerate(row):
            canvas.paste(img.convert("RGB"), (j * w, y + label_h))
    return canvas


def edit_grid(inputs: list[list[Image.Image]], rows: list[list[Image.Image]], labels: list[str], title: str = ""):
    """The validation grid of pairs: each row's input(s) (resized to the outputs' size), then its outputs."""
    w, h = rows[0][0].size
    full = [[im.resize((w, h), Image.Resampling.LANCZOS) for im in ins] + outs
            for ins, outs in zip(inputs, rows, strict=True)]
    return grid(full, [f"{label}  (input | outputs)" for label in labels], title=title)


def save_grid(image: Image.Image, samples_dir: Path, step: int, suffix: str = "") -> Path:
    samples_dir.mkdir(parents=True, exist_ok=True)
    path = samples_dir / f"step-{step:06d}{suffix}.png"
    tmp = path.with_suffix(".png.tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return path
