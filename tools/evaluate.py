#!/usr/bin/env python
"""Score LoRAs, embeddings, models or folders of images with DreamBench's metrics, and compare them in one table.

    python tools/evaluate.py --base toy --lora out/a --lora out/b --with-base --references data/sks_heart \\
        --prompts "a sks heart" "a sks heart on a black background" --token sks --class-word heart \\
        --clip-model toy --dino-model toy --steps 20 --guidance 5
    python tools/evaluate.py --base runwayml/stable-diffusion-v1-5 --lora out/dog --references data/dog \\
        --prompts dreambench_live --token sks --class-word dog --seeds 0 1 2 3
    python tools/evaluate.py --images samples/ --references data/dog --token sks --class-word dog

DINO and CLIP-I (subject fidelity) are the mean cosine similarity of every generated image with every reference
image; CLIP-T (prompt fidelity) the cosine between each image and its prompt (the trigger token dropped).
Raw cosines, not x100; each with a 95% percentile-bootstrap interval over the generated images. Every
candidate renders every prompt with the same seeds. Grids and all numbers (results.json) go to --out.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import _common

from finetune.eval import DEFAULT_CLIP, DEFAULT_DINO, METRIC_NAMES


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--base", help="base model the LoRAs/embeddings were trained on: diffusers folder, hub id, "
                   ".safetensors file or 'toy' (not needed for --images)")
    _common.add_family_arg(p)
    p.add_argument("--config", help="for a single-file base: a diffusers folder with the matching configs")
    p.add_argument("--allow-pickle", action="store_true", help="read .ckpt/.pt/.bin files (weights_only=True)")
    p.add_argument("--max-sequence-length", type=int, help="SD3/FLUX: T5 tokens per prompt, as the run's "
                   "model.max_sequence_length (default: the variant's: 256 SD3, 512 FLUX [dev], 256 [schnell])")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]", help="a LoRA to score (repeat)")
    p.add_argument("--embedding", action="append", default=[], metavar="PATH[:TOKEN]",
                   help="a Textual Inversion embedding to score (repeat)")
    p.add_argument("--model", action="append", default=[], metavar="PATH", help="a whole model to score (repeat)")
    p.add_argument("--images", action="append", default=[], metavar="DIR",
                   help="a folder of generated images, each with its prompt in a same-stem .txt (repeat)")
    p.add_argument("--with-base", action="store_true", help="also score the untouched base")
    p.add_argument("--references", type=Path, help="folder of reference images of the subject (DINO, CLIP-I)")
    p.add_argument("--on-bad-image", choices=["error", "skip"], default="error",
                   help="an unreadable reference image: stop naming it (default), or skip it with a warning")
    p.add_argument("--prompts", nargs="+", default=[], help="prompts, or one set: dreambench, dreambench_live, "
                   "dreambench_toy ('{}' = token + class word)")
    p.add_argument("--token", help="the trigger token in the prompts, e.g. sks")
    p.add_argument("--class-word", help="the subject's class noun, e.g. dog")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="one image per prompt and seed")
    p.add_argument("--metrics", nargs="+", choices=METRIC_NAMES, default=list(METRIC_NAMES), help="what to compute")
    p.add_argument("--clip-model", default=DEFAULT_CLIP, help="CLIP for CLIP-I/CLIP-T ('toy' for the toy base)")
    p.add_argument("--dino-model", default=DEFAULT_DINO, help="self-supervised ViT for DINO ('toy' for the toy)")
    p.add_argument("--steps", type=int, default=30, help="denoising steps")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the family's: 7.5 SD, 7.0 SD3, 3.5 FLUX)")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--scheduler", default="auto", choices=["auto", "ddim", "euler", "euler_a", "dpm++", "pndm", "base"],
                   help="sampler; auto: the family's (DDIM for SD 1/2/XL, the base's own for SD3 and FLUX)")
    p.add_argument("--width", type=int, help="image width (default: the base's)")
    p.add_argument("--height", type=int, help="image height (default: the base's)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="compute dtype")
    p.add_argument("--device", help="cuda, cpu, mps (default: cuda when available)")
    p.add_argument("--out", type=Path, default=Path("evaluation"), help="folder for grids and results.json")
    return p.parse_args(argv)


def _check(args) -> None:
    from finetune.errors import UserError

    generated = args.lora or args.embedding or args.model or args.with_base
    if not (generated or args.images):
        raise UserError("nothing to score: give --lora, --embedding, --model, --images or --with-base")
    if (args.lora or args.embedding or args.with_base) and not args.base:
        raise UserError("--lora, --embedding and --with-base need --base (the model they were trained on)")
    if generated and not args.prompts:
        raise UserError("--prompts: give the prompts to render (or a set such as dreambench)")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps {args.steps}: give at least 1 sampling step")
    for flag, value in (("--width", args.width), ("--height", args.height)):
        if value is not None and (value < 8 or value % 8):
            raise UserError(f"{flag} {value}: give a positive multiple of 8 (the VAE halves the size 3 times)")
    if any(s < 0 or s >= 2**32 for s in args.seeds or []):
        raise UserError("--seeds: give seeds from 0 to 4294967295")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise UserError(f"--guidance {args.guidance}: give a finite number")
    if {"clip_i", "dino"} & set(args.metrics) and args.references is None:
        raise UserError("--references: DINO and CLIP-I compare with reference images; give their folder "
                        "(or --metrics clip_t)")


def _prompts(args) -> list[str]:
    from finetune.errors import UserError
    from finetune.sections import ValidationSection

    one = args.prompts[0] if len(args.prompts) == 1 else None
    raw = one if one and len(one.split()) == 1 else args.prompts  # one word: a prompt set's name
    try:  # the recipe's own rules: prompt-set names, class word, token present
        return ValidationSection(prompts=raw, token=args.token, class_word=args.class_word,
                                 metrics=args.metrics).prompts
    except ValueError as e:
        msg = e.errors()[0]["msg"].removeprefix("Value error, ").replace("validation.class_word", "--class-word")
        raise UserError(f"--prompts: {msg}") from None


def candidates(args):
    from finetune.eval.compare import Candidate

    out = [Candidate("base", args.base)] if args.with_base else []
    for kind in ("lora", "embedding", "model", "images"):
        out += [Candidate(kind, spec) for spec in getattr(args, kind)]
    return out


def main(argv=None) -> int:
    import torch

    from finetune.eval.compare import Sampling, evaluate, table
    from finetune.eval.embedders import EvalModels
    from finetune.eval.references import reference_dir_images
    from finetune.eval.scoring import Scorer
    from finetune.train.validation import grid

    args = parse_args(argv)
    _check(args)
    prompts = _prompts(args) if args.prompts else []
    _common.quiet()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    refs = reference_dir_images(args.references, "--references", args.on_bad_image) if args.references else []
    models = EvalModels(args.clip_model, args.dino_model, dtype, keys=("--clip-model", "--dino-model"))
    scorer = Scorer(args.metrics, models, refs, args.token, args.class_word, device)
    sampling = Sampling(prompts, args.seeds, args.steps, args.guidance, args.negative, args.scheduler,
                        (args.width, args.height))
    args.out.mkdir(parents=True, exist_ok=True)

    def save_grid(cand, rows, row_prompts):
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in cand.label)
        path = args.out / f"{name}.png"
        grid(rows, row_prompts, title=cand.label[:120]).save(path)
        print(f"{cand.label}: {sum(len(r) for r in rows)} images, grid {path}")

    def loader(base):
        from finetune.models.base import resolve_base
        from finetune.models.components import LoadOptions, load_components

        base = resolve_base(base, family=args.family, config=args.config, allow_pickle=args.allow_pickle)
        return load_components(base.complete(), LoadOptions(max_sequence_length=args.max_sequence_length))

    results = evaluate(candidates(args), scorer, sampling, args.base, loader, device, dtype, on_rows=save_grid,
                       allow_pickle=args.allow_pickle, say=lambda line: print(line, flush=True))
    print()
    print(table(results, scorer.metrics))
    print(f"\n{len(refs)} reference images; mean [95% bootstrap interval over images]; raw cosines")
    data = {"references": str(args.references) if args.references else None, "prompts": prompts,
            "seeds": args.seeds, "models": {"clip": args.clip_model, "dino": args.dino_model},
            "candidates": {label: sc.to_json() for label, sc in results}}
    from finetune.export.io import write_text_atomic

    write_text_atomic(args.out / "results.json", json.dumps(data, indent=2))
    print(f"wrote {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_common.run(main))
