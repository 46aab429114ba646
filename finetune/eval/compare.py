"""Score several candidates the same way and compare them in one table (tools/evaluate.py is the CLI).

A candidate is the untouched base, a LoRA (any format tools/generate.py reads, `PATH[:SCALE]`), a Textual
Inversion embedding (`PATH[:TOKEN]`), a whole model (diffusers folder or single file), or a folder of images
already generated (each with its prompt in a same-stem .txt). Generated candidates render every prompt with
the same seeds, so rows differ only by the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.errors import DataError
from finetune.eval.scoring import LABELS, Scorer, Scores


@dataclass
class Candidate:
    kind: str  # base | lora | embedding | model | images
    spec: str = ""  # the path (with :SCALE or :TOKEN) as the user wrote it

    @property
    def label(self) -> str:
        return "base" if self.kind == "base" else f"{self.kind} {self.spec}"


@dataclass
class Sampling:
    """How generated candidates render: prompts x seeds, and the sampler settings."""

    prompts: list[str]
    seeds: list[int]
    steps: int = 30
    guidance_scale: float | None = None  # None: the family's default (7.5 SD, 7.0 SD3, 3.5 FLUX)
    negative_prompt: str = ""
    scheduler: str = "auto"  # the family's sampler (DDIM for SD 1/2/XL, the base's flow sampler for SD3/FLUX)
    size: tuple[int | None, int | None] = (None, None)


def images_with_prompts(folder: Path, need_prompts: bool) -> tuple[list[list], list[str]]:
    """A folder of generated images -> rows grouped by prompt (from same-stem .txt files)."""
    from finetune.data.images import decode
    from finetune.data.records import image_files, need_dir

    files = image_files(need_dir(str(folder), "--images"))
    if not files:
        raise DataError(f"{folder}: no images (--images); add .png/.jpg/.webp files")
    rows: dict[str, list] = {}
    for f in files:
        side = f.with_suffix(".txt")
        if need_prompts and not side.is_file():
            raise DataError(f"{f}: no {side.name} with its prompt; CLIP-T needs one per image "
                            "(or leave clip_t out with --metrics clip_i dino)")
        prompt = " ".join(side.read_text(encoding="utf-8").split()) if side.is_file() else ""
        rows.setdefault(prompt, []).append(decode(f.read_bytes()))
    return list(rows.values()), list(rows)


def _components(cand: Candidate, base: str | None, loader, allow_pickle: bool = False):
    from finetune.errors import ModelError

    if cand.kind == "model":
        return loader(cand.spec)
    if base is None:
        raise ModelError(f"{cand.kind} {cand.spec}: needs --base (the model it was trained on)")
    comps = loader(base)
    if cand.kind == "lora":
        from finetune.export.merge import LoraSpec, fuse_all, read_all

        spec = LoraSpec.parse(cand.spec)
        # the family fits the file's key names (kohya, BFL, diffusers) to this base's modules
        fuse_all(comps, read_all([spec], allow_pickle, comps.family, comps.named_modules()), [spec.weight])
    return comps


def render_candidate(cand: Candidate, base: str | None, sampling: Sampling, loader, device, dtype,
                     allow_pickle: bool = False, progress: bool = False) -> list[list]:
    """rows[p][s] for one generated candidate; the base is reloaded for each, so none sees another's weights.
    Any family: the pipeline, sampler, guidance and embedding loading all come from the family object."""
    from finetune.sections import ValidationSection
    from finetune.train.validation import make_pipeline, render

    comps = _components(cand, base, loader, allow_pickle)
    cfg = ValidationSection(prompts=sampling.prompts, seeds=sampling.seeds, steps=sampling.steps,
                            guidance_scale=sampling.guidance_scale, negative_prompt=sampling.negative_prompt,
                            scheduler=sampling.scheduler)
    pipe = make_pipeline(comps, cfg)
    if cand.kind == "embedding":
        from finetune.export.embeddings import load_into_pipeline

        path, _, token = cand.spec.partition(":") if not Path(cand.spec).exists() else (cand.spec, "", "")
        load_into_pipeline(pipe, path, token or None, allow_pickle, comps.family)
    pipe.to(device, dtype)
    text = None if cand.kind == "embedding" else _family_text(comps, cfg, device)
    return render(pipe, sampling.prompts, sampling.seeds, cfg, sampling.size, device, text=text,
                  family=comps.family, progress=f"{cand.label}:" if progress else None)


@torch.no_grad()
def _family_text(comps, cfg, device) -> dict | None:
    """Prompts encoded the way a training run's grids encode them: families whose runs cache text (SD3, FLUX)
    render validation grids from the family's own encoding (its max_sequence_length, not the pipeline's
    default), so a kept export renders here the images its run scored. Embedding candidates keep the
    pipeline's encoding, which expands multi-vector tokens."""
    if not comps.family.cache_text_by_default:
        return None
    prompts = list(dict.fromkeys([*cfg.prompts, cfg.negative_prompt]))
    return {p: comps.family.encode_prompt(comps, [p], device) for p in prompts}


def table(results: list[tuple[str, Scores]], metrics: list[str]) -> str:
    """One row per candidate: images scored and each metric as mean [95% interval]."""
    width = max([len("candidate"), *(len(label) for label, _ in results)])
    cols = [m for m in ("dino", "clip_i", "clip_t") if m in metrics]
    head = f"{'candidate':<{width}}  " + "  ".join(f"{LABELS[m]:<22}" for m in cols)
    lines = [head, "-" * len(head)]
    for label, sc in results:
        cells = [f"{str(sc.overall[m]) if m in sc.overall else '-':<22}" for m in cols]
        lines.append(f"{label:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def evaluate(candidates: list[Candidate], scorer: Scorer, sampling: Sampling | None, base: str | None,
             loader, device, dtype, on_rows=None, allow_pickle: bool = False,
             say=None) -> list[tuple[str, Scores]]:
    """Score every candidate; `on_rows(candidate, rows, prompts)` sees each one's images (to save a grid).
    `say(line)`: what is happening, candidate by candidate (rendering shows the pipeline's progress bar too)."""
    results = []
    for i, cand in enumerate(candidates):
        if say is not None:
            say(f"[{i + 1}/{len(candidates)}] {cand.label}: " + ("reading the images" if cand.kind == "images"
                                                                  else "loading, then sampling"))
        if cand.kind == "images":
            rows, prompts = images_with_prompts(Path(cand.spec), "clip_t" in scorer.metrics)
        else:
            rows, prompts = (render_candidate(cand, base, sampling, loader, device, dtype, allow_pickle,
                                              progress=say is not None), sampling.prompts)
        if on_rows is not None:
            on_rows(cand, rows, prompts)
        if say is not None:
            say(f"[{i + 1}/{len(candidates)}] {cand.label}: scoring {sum(len(r) for r in rows)} images"
                + (" (the metric models load first)" if i == 0 else ""))
        results.append((cand.label, scorer.score(rows, prompts)))
    return results
