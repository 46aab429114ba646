"""Validation pairs for edit and reference models: each prompt's conditioning images (validation.images), brought
to the geometry training gave them, rendered through the family's edit pipeline into a grid whose rows show the
input(s), then one output per seed.

An image is a path, or 'toy:<colour> <shape>' (optionally 'on a <background> background'): a toy world drawing at
the canvas centre, so a toy recipe needs no files.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
from PIL import Image

from finetune.errors import DataError

TOY = re.compile(r"toy:\s*(?P<colour>\w+)\s+(?P<shape>\w+)(?:\s+on\s+an?\s+(?P<bg>\w+)\s+background)?\s*$")


def open_image(spec: str, key: str) -> Image.Image:
    """A validation image from its spec (a path or 'toy:<colour> <shape>'), upright RGB."""
    match = TOY.match(spec)
    if match:
        from finetune.toy import world

        colour, shape, bg = match["colour"], match["shape"], match["bg"] or "white"
        if colour not in {**world.COLOURS, **world.SUBJECT_COLOURS} or shape not in [*world.SHAPES, "heart"] \
                or bg not in world.BACKGROUNDS:
            raise DataError(f"{key}: '{spec}' is not a toy drawing; say 'toy:<colour> <shape>' with a colour of "
                            f"{', '.join(world.COLOURS)} and a shape of {', '.join(world.SHAPES)}")
        return world.draw(shape, colour, bg)
    from finetune.data.images import BadImage, decode

    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataError(f"{key}: {spec} does not exist; give an image path or 'toy:<colour> <shape>'")
    try:
        return decode(path.read_bytes())
    except BadImage as e:
        raise DataError(f"{key}: {spec} {e}; replace it") from None


def _specs(items, prompts: int) -> list:
    return list(items) * prompts if len(items) == 1 else list(items)


def fit(im: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """An image resized to cover `bucket` (h, w) and centre-cropped, as the training data cuts a target."""
    from finetune.data.images import cover, crop_flip, resize

    c = cover((im.height, im.width), bucket, "center")
    arr, _ = crop_flip(resize(im, c.rh, c.rw), c, bucket, False)
    return Image.fromarray(arr.copy())


def pair_images(recipe, size: tuple[int, int]) -> list[list[Image.Image]]:
    """Each prompt's conditioning images at the geometry training gave them, for an output of `size` (w, h):
    spatial images cover it and are centre-cropped like a target; references take their own bucket."""
    from finetune.data.buckets import reference_bucket

    v, cond, d = recipe.validation, recipe.data.conditioning, recipe.data
    bucket = (size[1], size[0])
    own = bucket if cond.role == "spatial" else reference_bucket(bucket, d.resolution, cond.resolution or d.resolution)
    rows = []
    for i, spec in enumerate(_specs(v.images, len(v.prompts))):
        specs = [spec] if isinstance(spec, str) else list(spec)
        if len(specs) != cond.count:
            raise DataError(f"validation.images.{i}: {len(specs)} image(s), but data.conditioning.count is "
                            f"{cond.count}; give each prompt {cond.count}")
        rows.append([fit(open_image(s, f"validation.images.{i}" + (f".{j}" if len(specs) > 1 else "")), own)
                     for j, s in enumerate(specs)])
    return rows


def validation_pairs(recipe) -> list[list[Image.Image]]:
    """The validation pairs' conditioning images at the validation size (none without validation.images)."""
    v, res = recipe.validation, recipe.data.resolution
    return pair_images(recipe, (v.width or res, v.height or res)) if v.images else []


def target_images(recipe) -> list[Image.Image | None]:
    """Each prompt's target image (validation.targets), or None where it has none."""
    v = recipe.validation
    specs = _specs(v.targets, len(v.prompts)) if v.targets else [None] * len(v.prompts)
    return [None if s is None else open_image(s, f"validation.targets.{i}") for i, s in enumerate(specs)]


def as_pixels(images: list[Image.Image]) -> list[torch.Tensor]:
    """Conditioning images as the trainer feeds them: one [1, 3, H, W] tensor in [-1, 1] per image."""
    import numpy as np

    return [torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0 for im in images]


def pair_text(encode, prompts: list[str], images: list[list[Image.Image]], negative: str) -> dict:
    """Pre-encoded validation text for a family whose text encoder sees the images: {(prompt, row): embeddings}
    for each prompt and for the negative prompt with that row's images. `encode(captions, images)`."""
    out = {}
    for i, (prompt, row) in enumerate(zip(prompts, images, strict=True)):
        for text in dict.fromkeys([prompt, negative]):
            out[(text, i)] = encode([text], as_pixels(row))
    return out


@torch.no_grad()
def render_edits(pipe, prompts: list[str], images: list[list[Image.Image]], seeds: list[int], cfg, size, device,
                 family, text: dict | None = None, max_sequence_length: int | None = None,
                 progress: str | None = None) -> list[list[Image.Image]]:
    """rows[p][s]: prompt p's output for seed s, its conditioning images going through the edit pipeline.
    `text`: pre-encoded prompts, keyed by prompt (or by (prompt, row) where the text encoder sees the images);
    `progress`: a label for the pipeline's progress bar (None: silent)."""
    width, height = size
    guide = family.guidance_kwargs(pipe, cfg.guidance_scale)
    rows = []
    for i, (prompt, row) in enumerate(zip(prompts, images, strict=True)):
        if progress is not None:
            pipe.set_progress_bar_config(desc=f"{progress} editing input {i + 1}/{len(prompts)} x {len(seeds)} seeds",
                                         leave=False, file=sys.stderr, unit="step")
        out_row = []
        for seed in seeds:  # one call per seed: the edit pipelines take one example at a time
            words = _words(family, prompt, cfg.negative_prompt, i, text, guide, max_sequence_length, device)
            out = pipe(**words, **family.edit_kwargs(row, size), **guide, num_inference_steps=cfg.steps,
                       generator=torch.Generator(device="cpu").manual_seed(seed), width=width, height=height,
                       output_type="pil")
            out_row.append(out.images[0])
        rows.append(out_row)
    return rows


def _words(family, prompt, negative, row, text, guide, max_sequence_length, device) -> dict:
    if text is not None:
        key = (lambda p: (p, row)) if family.prompt_reads_conditions else (lambda p: p)
        pos = {k: v.to(device) for k, v in text[key(prompt)].items()}
        neg = {k: v.to(device) for k, v in text[key(negative)].items()}
        if family.prompt_reads_conditions:  # prompts padded alike, as the pipeline checks the shapes agree
            pos, neg = _same_length(pos, neg)
        return family.pipeline_prompt_kwargs(pos, neg)
    words: dict = {"prompt": prompt}
    if negative or "true_cfg_scale" in guide:
        words["negative_prompt"] = negative
    if max_sequence_length:
        words["max_sequence_length"] = max_sequence_length
    return words


def _same_length(a: dict, b: dict) -> tuple[dict, dict]:
    from finetune.data.dataset import stack_padded

    out_a, out_b = {}, {}
    for k in a:
        both = stack_padded([a[k][0], b[k][0]])
        out_a[k], out_b[k] = both[:1], both[1:]
    return out_a, out_b

