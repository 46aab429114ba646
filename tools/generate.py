#!/usr/bin/env python
"""Prompts -> images from a base plus any number of LoRAs and embeddings, saved as a labelled grid.

    python tools/generate.py "a sks circle" "a (red:1.3) square" --base toy --lora out/run:0.8 --seeds 0 1 2
    python tools/generate.py "a sks circle" --base toy --embedding out/ti/sks.safetensors --out grid.png
    python tools/generate.py "a watercolor" --base toy --init-image photo.png --strength 0.6

LoRAs (diffusers, kohya, DoRA, LoHa, LoKr; `PATH[:SCALE]`) are fused into the weights before sampling.
Prompt weighting: `(word:1.3)` (A1111 style) or compel's own syntax (`word++`, `(word)1.3`), through every text
encoder of the family (SDXL: both, with the pooled embedding); image-to-image with any family.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import _common

SCHEDULER_CHOICES = ["ddim", "euler", "euler_a", "dpm++", "pndm", "base"]
A1111_WEIGHT = re.compile(r"\(([^():]+):\s*([0-9.]+)\)")
WEIGHT_SYNTAX = re.compile(r"[()+\-\[\]]")  # anything compel would read as weighting


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("prompts", nargs="+", help="one grid row per prompt")
    _common.add_base_args(p)
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]", help="LoRA to apply (repeat)")
    p.add_argument("--embedding", action="append", default=[], metavar="PATH[:TOKEN]",
                   help="textual-inversion embedding (repeat); TOKEN overrides the file's token")
    p.add_argument("--negative", default="", help="negative prompt for every image")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="one grid column per seed")
    p.add_argument("--seed", type=int, default=0, help="first seed when --seeds is not given")
    p.add_argument("--batch", type=int, default=2, help="images per prompt when --seeds is not given")
    p.add_argument("--steps", type=int, default=30, help="denoising steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--scheduler", choices=SCHEDULER_CHOICES, default="ddim", help="sampler")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="compute dtype")
    p.add_argument("--device", default=None, help="cuda, cpu, mps (default: cuda when available)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the base's)")
    p.add_argument("--height", type=int, default=None, help="image height (default: the base's)")
    p.add_argument("--init-image", type=Path, help="image-to-image: the starting image")
    p.add_argument("--strength", type=float, default=0.6, help="image-to-image: how much to change (0..1)")
    p.add_argument("--out", type=Path, default=Path("generated.png"), help="grid image to write")
    p.add_argument("--save-images", type=Path, help="also save every image into this folder")
    return p.parse_args(argv)


def to_compel(prompt: str) -> str:
    """A1111 '(word:1.3)' -> compel '(word)1.3'; other text unchanged."""
    return A1111_WEIGHT.sub(lambda m: f"({m[1]}){m[2]}", prompt)


def build_pipeline(args):
    import torch

    from finetune.errors import ModelError
    from finetune.export.embeddings import load_into_pipeline
    from finetune.export.merge import LoraSpec, fuse_all, read_all
    from finetune.train.validation import SCHEDULERS

    comps = _common.load_base(args.base, args.family, args.config, args.allow_pickle)
    specs = [LoraSpec.parse(s) for s in args.lora]
    adapters = read_all(specs, args.allow_pickle, comps.family, comps.named_modules())
    fuse_all(comps, adapters, [s.weight for s in specs])
    pipe = comps.pipeline()
    if args.scheduler != "base":
        import diffusers

        pipe.scheduler = getattr(diffusers, SCHEDULERS[args.scheduler]).from_config(pipe.scheduler.config)
    tokens = []
    for item in args.embedding:
        path, _, token = item.partition(":") if not Path(item).exists() else (item, "", "")
        tokens.append(load_into_pipeline(pipe, path, token or None, args.allow_pickle, comps.family))
    if args.init_image is not None:
        if not args.init_image.is_file():
            raise ModelError(f"{args.init_image}: no such image")
        if not 0.0 < args.strength <= 1.0:
            raise ModelError(f"--strength {args.strength}: must be in (0, 1]")
        from diffusers import AutoPipelineForImage2Image

        pipe = AutoPipelineForImage2Image.from_pipe(pipe)  # the family's own image-to-image pipeline
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe, comps, tokens


def encode(pipe, family, prompt: str, negative: str) -> dict:
    """Weighted prompt embeddings through compel, built from the family's text encoders (SDXL: both, the
    penultimate hidden states and the second encoder's pooled output, as its pipeline encodes); plain prompts
    go straight to the pipeline."""
    import torch
    from compel import Compel, DiffusersTextualInversionManager, ReturnedEmbeddingsType

    if not WEIGHT_SYNTAX.search(prompt + negative):
        return {"prompt": prompt, "negative_prompt": negative or None}
    encoders = [getattr(pipe, n) for n in family.text_encoder_names]
    tokenizers = [getattr(pipe, n) for n in family.tokenizer_names]
    layer = {"last": ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED,
             "penultimate": ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED}[family.prompt_layer]
    pooled = [False] * (len(encoders) - 1) + [family.pooled_prompt]
    one = len(encoders) == 1
    compel = Compel(tokenizer=tokenizers[0] if one else tokenizers, text_encoder=encoders[0] if one else encoders,
                    returned_embeddings_type=layer, requires_pooled=pooled[0] if one else pooled,
                    truncate_long_prompts=False, textual_inversion_manager=DiffusersTextualInversionManager(pipe))
    out = compel([to_compel(prompt), to_compel(negative)])  # padded to one length
    cond, pool = out if family.pooled_prompt else (out, None)
    if not negative and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        cond = torch.cat([cond[:1], torch.zeros_like(cond[1:])])  # what the pipeline does for no negative
        pool = None if pool is None else torch.cat([pool[:1], torch.zeros_like(pool[1:])])
    text = {"prompt_embeds": cond[:1], "negative_prompt_embeds": cond[1:]}
    if pool is not None:
        text |= {"pooled_prompt_embeds": pool[:1], "negative_pooled_prompt_embeds": pool[1:]}
    return text


def main(argv=None) -> int:
    import torch
    from PIL import Image
    from tqdm import tqdm

    args = parse_args(argv)
    seeds = args.seeds or list(range(args.seed, args.seed + args.batch))
    pipe, comps, _ = build_pipeline(args)
    extra = {}
    if args.init_image is not None:
        extra = {"image": Image.open(args.init_image).convert("RGB"), "strength": args.strength}
    else:
        size = comps.denoiser.config.sample_size * 2 ** (len(comps.vae.config.block_out_channels) - 1)
        extra = {"width": args.width or size, "height": args.height or size}
    rows = []
    for prompt in tqdm(args.prompts, desc="prompts", disable=len(args.prompts) < 2):
        text = encode(pipe, comps.family, prompt, args.negative)
        images = []
        for seed in seeds:
            g = torch.Generator("cpu").manual_seed(seed)
            with torch.no_grad():
                out = pipe(**text, num_inference_steps=args.steps, guidance_scale=args.guidance, generator=g,
                           **extra)
            images.append(out.images[0])
        rows.append(images)
    _save(args, rows, seeds)
    return 0


def _save(args, rows, seeds) -> None:
    from finetune.train.validation import grid

    title = f"{Path(args.base).name} | " + " ".join(Path(s).name for s in args.lora + args.embedding)
    image = grid(rows, args.prompts, title=f"{title} | seeds {seeds}"[:200])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    print(f"wrote {args.out}")
    if args.save_images:
        args.save_images.mkdir(parents=True, exist_ok=True)
        for i, row in enumerate(rows):
            for seed, img in zip(seeds, row, strict=True):
                img.save(args.save_images / f"p{i:02d}-s{seed}.png")
        print(f"wrote {sum(len(r) for r in rows)} images to {args.save_images}")


if __name__ == "__main__":
    raise SystemExit(_common.run(main))
