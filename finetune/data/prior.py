"""DreamBooth prior preservation: make `data.prior.class_dir` hold `num_class_images` class images,
generating the missing ones with the untouched base before training.

    ensure_class_images(recipe, comps, acc)   # the trainer calls it, main process first

Generated image k is `class-0000k.png` beside `class-0000k.txt` (the class prompt), and its starting noise
comes from a generator seeded by (train.seed, k) alone. So an interrupted generation keeps what it wrote,
and asking for 8 images where 4 exist makes exactly images 4..7, the ones a fresh run of 8 would have made.
Each file is written to a hidden temporary name and renamed, so a half-written image is never a class image.
Images a user put in the folder count toward the total and are never touched.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from finetune.data.config import PriorSection
from finetune.data.scan import class_image_files, count_class_images
from finetune.errors import DataError

STEM = "class-{:05d}"


def missing_indices(prior: PriorSection) -> list[int]:
    """Indices of the class images still to generate: the lowest free `class-NNNNN` names."""
    need = prior.num_class_images - count_class_images(prior)
    taken = {p.stem for p in class_image_files(prior)}
    out: list[int] = []
    k = 0
    while len(out) < need:
        if STEM.format(k) not in taken:
            out.append(k)
        k += 1
    return out


def image_seed(seed: int, index: int) -> int:
    """The noise seed of class image `index`: independent of batching and of which images already exist."""
    digest = hashlib.blake2b(f"class-image:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: torch seeds are int64


def ensure_class_images(recipe, comps, acc=None) -> list[Path]:
    """Generate the missing class images (main process only); returns the images written."""
    prior = recipe.data.prior
    if prior is None or (acc is not None and not acc.is_main_process):
        return []  # the others wait in main_process_first, then find the folder complete
    root = _class_dir(prior)
    todo = missing_indices(prior)
    if not todo:
        return []
    print(f"prior preservation: generating {len(todo)} of {prior.num_class_images} class images "
          f"({prior.class_prompt!r}) into {root}")
    # called before training: a method's fresh adapters (LoRA B = 0) still leave the base's output unchanged
    pipe = generation_pipeline(comps)
    autocast = acc.autocast() if acc is not None else nullcontext()
    size = recipe.data.resolution
    written: list[Path] = []
    from tqdm.auto import tqdm

    with autocast, tqdm(total=len(todo), desc="class images", unit="img", disable=not recipe.logging.progress) as bar:
        for start in range(0, len(todo), prior.generate_batch_size):
            batch = todo[start : start + prior.generate_batch_size]
            images = render(pipe, prior, [image_seed(recipe.train.seed, k) for k in batch], size)
            for k, image in zip(batch, images, strict=True):
                written.append(_save(root, k, image, prior.class_prompt))
            bar.update(len(batch))
    return written


def _class_dir(prior: PriorSection) -> Path:
    root = Path(prior.class_dir).expanduser()
    if root.exists() and not root.is_dir():
        raise DataError(f"{root}: data.prior.class_dir is a file; point it at a folder for the class images")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{root}: cannot create data.prior.class_dir ({e.strerror}); choose a writable folder") from None
    return root


def generation_pipeline(comps):
    """The base's pipeline with a DDIM sampler: the training scheduler (DDPM) needs ~1000 steps per image."""
    from diffusers import DDIMScheduler

    pipe = comps.pipeline()
    pipe.scheduler = DDIMScheduler.from_config(comps.scheduler.config)
    pipe.set_progress_bar_config(disable=True)  # one bar over images, not one per denoising loop
    return pipe


def render(pipe, prior: PriorSection, seeds: list[int], size: int) -> list:
    """One image per seed. CPU generators, so an image does not depend on the device it was made on."""
    import torch

    gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    out = pipe([prior.class_prompt] * len(seeds), num_inference_steps=prior.generate_steps,
               guidance_scale=prior.guidance_scale, generator=gens, height=size, width=size, output_type="pil")
    return list(out.images)


def _save(root: Path, index: int, image, prompt: str) -> Path:
    stem = STEM.format(index)
    # caption first: an image that exists always has its caption beside it
    _atomic(root / f"{stem}.txt", lambda f: f.write(prompt.encode()))
    return _atomic(root / f"{stem}.png", lambda f: image.save(f, format="PNG"))


def _atomic(path: Path, write: Callable) -> Path:
    """Write through a hidden temporary file in the same folder and rename it into place."""
    from finetune.export.io import atomic_open

    with atomic_open(path, "wb") as f:
        write(f)
    return path
