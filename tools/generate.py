#!/usr/bin/env python
"""Prompts -> images from a base plus any number of LoRAs and embeddings, saved as a labelled grid.

    python tools/generate.py "a sks circle" "a (red:1.3) square" --base toy --lora out/run:0.8 --seeds 0 1 2
    python tools/generate.py "a sks circle" --base toy --embedding out/ti/sks.safetensors --out grid.png
    python tools/generate.py "a watercolor" --base toy --init-image photo.png --strength 0.6
    python tools/generate.py "make it blue" --base toy-flux --lora out/toy-flux-edit --image input.png \
        --guidance 5 --steps 28 --max-sequence-length 32
    python tools/generate.py "a red star on a white background" --base toy --controlnet out/toy-controlnet \
        --image mask.png --guidance 6 --steps 25
    python tools/generate.py "a red star on a white background" --base toy-flux --lora out/toy-flux-control \
        --image mask.png --steps 28 --max-sequence-length 32

LoRAs (diffusers, kohya, DoRA, LoHa, LoKr; `PATH[:SCALE]`) are fused into the weights before sampling.
Prompt weighting: `(word:1.3)` (A1111 style) or compel's own syntax (`word++`, `(word)1.3`), through every text
encoder of the family (SDXL: both, with the pooled embedding); image-to-image with any family.
Control: `--image` is the control image of a ControlNet (`--controlnet`, through the family's stock ControlNet
pipeline) or of a Control LoRA (told by its shapes: its input layer reads the control latents too; the base's input
projection is widened for it as FluxControlPipeline's loader does, then the LoRA is fused).
"""

from __future__ import annotations

import argparse
import re
import sys
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
    p.add_argument("--seed", type=int, default=0, help="first seed when --seeds is not given (default 0)")
    p.add_argument("--batch", type=int, default=2, help="images per prompt when --seeds is not given (default 2)")
    p.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--scheduler", choices=SCHEDULER_CHOICES, default=None,
                   help="sampler (default: the family's, e.g. ddim for SD, the base's own for flow models and Wan)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="compute dtype (default fp32)")
    p.add_argument("--device", default=None, help="cuda, cpu, mps (default: cuda when available)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the base's)")
    p.add_argument("--height", type=int, default=None, help="image height (default: the base's)")
    p.add_argument("--init-image", type=Path, help="image-to-image: the starting image (image-to-video bases: "
                   "the first frame)")
    p.add_argument("--frames", type=int, default=None, help="video bases: frames per clip (4k + 1; default: the "
                   "base's own, 81 for Wan)")
    p.add_argument("--fps", type=int, default=16, help="video bases: frame rate of the GIF / MP4s written (default 16)")
    p.add_argument("--strength", type=float, default=0.6,
                   help="image-to-image: how much to change, 0..1 (default 0.6)")
    p.add_argument("--image", type=Path, action="append", default=[],
                   help="edit and reference models: a conditioning image (repeat for several), through the "
                   "family's edit pipeline; control models (--controlnet, a Control LoRA): the control image; each "
                   "grid row starts with the input(s)")
    p.add_argument("--controlnet", type=Path, default=None,
                   help="a ControlNet steering the base: a controlnet run's folder or its controlnet/ folder "
                   "(with --image, the control image)")
    p.add_argument("--max-sequence-length", type=int, default=None,
                   help="text tokens the base reads (the toy FLUX base: 32)")
    p.add_argument("--out", type=Path, default=None,
                   help="grid image to write (default: output/generated/NAME-NNN.png, NAME the first --lora's (or the "
                   "base's) name, NNN the next free number; video bases: frame strips, and an animated GIF beside it)")
    p.add_argument("--save-images", type=Path, help="also save every image (video: every clip as MP4) into this folder")
    p.add_argument("--overwrite", action="store_true", help="replace existing output images (never an input)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = default_out(args.lora[0] if args.lora else str(args.controlnet or args.base))
    return args


def default_out(source: str) -> Path:
    """A new file under output/generated/ named after what the grid shows (the first LoRA, else the base), never
    in the current folder and never over an earlier grid: my-lora-000.png, my-lora-001.png, ..."""
    path = Path(source) if Path(source).exists() else Path(source.rpartition(":")[0] or source)
    if path.suffix == ".safetensors" and path.stem in ("pytorch_lora_weights", "peft_adapter"):
        path = path.parent  # a run's diffusers file: the run's name says more
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in (path.stem or "grid"))
    folder = Path("output") / "generated"
    taken = {p.name for p in folder.glob(f"{name}-*.png")}
    n = next(i for i in range(len(taken) + 1) if f"{name}-{i:03d}.png" not in taken)
    return folder / f"{name}-{n:03d}.png"


def check_args(args, seeds: list[int]):
    """Every value and path checked before the base loads: one line naming the flag, or the opened init image."""
    import math

    from PIL import Image

    from finetune.errors import ModelError
    from finetune.export.io import check_output

    for flag, value in (("--steps", args.steps), ("--batch", args.batch), ("--frames", args.frames or 1),
                        ("--fps", args.fps)):
        if value < 1:
            raise ModelError(f"{flag} {value}: must be at least 1")
    for flag, value in (("--width", args.width), ("--height", args.height)):
        if value is not None and (value < 8 or value % 8):
            raise ModelError(f"{flag} {value}: must be a positive multiple of 8 (the VAE halves the size 3 times)")
    _check_device(args.device)
    if not math.isfinite(args.guidance):
        raise ModelError(f"--guidance {args.guidance}: must be a finite number, e.g. 7.5")
    if not all(0 <= s < 2**64 for s in seeds):
        raise ModelError(f"--seeds {seeds}: seeds must be in 0 .. 2^64-1")
    if args.out.suffix.lower() not in Image.registered_extensions():
        raise ModelError(f"--out {args.out}: unknown image type '{args.out.suffix}'; use .png or .jpg")
    inputs = [Path(args.base), args.init_image, *args.image, args.controlnet,
              *(Path(s.rpartition(":")[0] or s) for s in args.lora),
              *(Path(s) for s in args.lora + args.embedding)]
    check_output(args.out, inputs, args.overwrite)
    if args.save_images is not None:
        for i in range(len(args.prompts)):
            for seed in seeds:
                check_output(args.save_images / f"p{i:02d}-s{seed}.png", inputs, args.overwrite, "--save-images")
    if args.image and args.init_image is not None:
        raise ModelError("--image (an edit model's input) and --init-image (image-to-image) do not mix; use one")
    if args.controlnet is not None and len(args.image) != 1:
        raise ModelError(f"--controlnet: a ControlNet is steered by one control image; give one --image (got "
                         f"{len(args.image)})")
    if args.controlnet is not None and not args.controlnet.exists():
        raise ModelError(f"{args.controlnet}: no such folder (--controlnet); give a controlnet run's folder")
    args.image_pil = [_open_image(path, "--image") for path in args.image]
    if args.init_image is None:
        return None
    if not 0.0 < args.strength <= 1.0:
        raise ModelError(f"--strength {args.strength}: must be in (0, 1]")
    if int(args.steps * args.strength) < 1:
        raise ModelError(f"--steps {args.steps} at --strength {args.strength} leaves no denoising step; "
                         "raise --steps or --strength")
    return _open_image(args.init_image, "--init-image")


def _open_image(path: Path, flag: str):
    from PIL import Image

    from finetune.errors import ModelError

    if not path.is_file():
        raise ModelError(f"{path}: no such image ({flag})")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ModelError(f"{path}: not a readable image ({str(e).splitlines()[0][:120]}); "
                         "give a PNG or JPEG") from None


def to_compel(prompt: str) -> str:
    """A1111 '(word:1.3)' -> compel '(word)1.3'; other text unchanged."""
    return A1111_WEIGHT.sub(lambda m: f"({m[1]}){m[2]}", prompt)


def build_pipeline(args):
    import torch

    from finetune.export.embeddings import load_into_pipeline
    from finetune.export.merge import LoraSpec, fuse_all, read_all
    from finetune.train.validation import SCHEDULERS

    comps = _common.load_base(args.base, args.family, args.config, args.allow_pickle)
    specs = [LoraSpec.parse(s) for s in args.lora]
    adapters = read_all(specs, args.allow_pickle, comps.family, comps.named_modules())
    _as_control(args, comps, adapters)
    fuse_all(comps, adapters, [s.weight for s in specs])
    if args.image and not comps.family.edit_pipeline_class:
        from finetune.errors import ModelError

        raise ModelError(f"--image: the {comps.family.name} family takes no conditioning images; leave --image out, "
                         "give a --controlnet, or use an edit base (Kontext, Qwen-Image-Edit, FLUX.2 [klein], a FLUX.1 "
                         "edit LoRA)")
    pipe = comps.pipeline(edit=bool(args.image))
    choice = args.scheduler or comps.family.default_sampler
    if choice != "base":
        import diffusers

        pipe.scheduler = getattr(diffusers, SCHEDULERS[choice]).from_config(pipe.scheduler.config)
    tokens = []
    for item in args.embedding:
        path, _, token = item.partition(":") if not Path(item).exists() else (item, "", "")
        tokens.append(load_into_pipeline(pipe, path, token or None, args.allow_pickle, comps.family))
    if args.init_image is not None and not comps.family.video:  # image-to-video pipelines take the frame themselves
        from diffusers import AutoPipelineForImage2Image

        pipe = AutoPipelineForImage2Image.from_pipe(pipe)  # the family's own image-to-image pipeline
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe, comps, tokens


def _as_control(args, comps, adapters) -> None:
    """The base as its family's control variant when the inputs make it one: `--controlnet` joins it (the
    family's ControlNet pipeline then runs), or a Control LoRA among the LoRAs (its input layer reads the control
    latents too) widens the base's input projection with zero columns, as FluxControlPipeline's loader does,
    before the LoRAs are fused."""
    from finetune.errors import ModelError
    from finetune.models.families import FAMILIES

    if args.controlnet is not None:
        variant = FAMILIES.get(comps.family.controlnet_family or "")
        if variant is None:
            raise ModelError(f"--controlnet: the {comps.family.name} family has no ControlNet pipeline here (README's "
                             "family table lists those with one)")
        from finetune.export.controlnet import read_controlnet

        comps.added["controlnet"] = read_controlnet(args.controlnet, variant.controlnet_class)
        comps.family = variant
        return
    variant = FAMILIES.get(comps.family.control_family or "")
    control = [a for a in adapters if variant is not None and variant.reads_control(a, comps.denoiser)]
    if not control:
        return
    if not args.image:
        raise ModelError(f"{control[0].path}: a Control LoRA; give its control image with --image")
    comps.family = variant
    variant.widen_input(comps.denoiser)


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
    import inspect

    import torch
    from tqdm import tqdm

    args = parse_args(argv)
    seeds = args.seeds or list(range(args.seed, args.seed + args.batch))
    init = check_args(args, seeds)
    print(f"loading {args.base}" + (f" with {len(args.lora)} LoRA(s)" if args.lora else ""), flush=True)
    pipe, comps, _ = build_pipeline(args)
    guide = {"guidance_scale": args.guidance}
    video = comps.family.video
    if video:
        extra = _video_inputs(args, comps, init)
    elif init is not None:
        extra = {"image": init, "strength": args.strength}
    else:
        size = None if args.width and args.height else _default_size(pipe, comps)
        extra = {"width": args.width or size, "height": args.height or size}
    if args.image_pil:  # an edit: the inputs cut to the output size, handed over as the family's pipeline takes them
        from finetune.train.edits import fit

        inputs = [fit(im, (extra["height"], extra["width"])) for im in args.image_pil]
        extra |= comps.family.edit_kwargs(inputs, (extra["width"], extra["height"]))
        guide = comps.family.guidance_kwargs(pipe, args.guidance)
    if args.max_sequence_length:
        extra["max_sequence_length"] = args.max_sequence_length
    takes = inspect.signature(pipe.__call__).parameters
    if "negative_prompt" not in takes and "negative_prompt_embeds" not in takes:
        if args.negative:
            from finetune.errors import ModelError

            raise ModelError(f"--negative: {type(pipe).__name__} takes no negative prompt; leave --negative out")
        takes_negative = False
    else:
        takes_negative = True
    rows = []
    bar = tqdm(total=len(args.prompts) * len(seeds), desc="generating", unit="image", file=sys.stderr)
    for prompt in args.prompts:
        text = encode(pipe, comps.family, prompt, args.negative)
        if not takes_negative:  # a pipeline without CFG (FluxControlPipeline)
            text.pop("negative_prompt", None)
        if "true_cfg_scale" in guide and "prompt" in text:  # true CFG runs only with a negative, even an empty one
            text["negative_prompt"] = args.negative
        images = []
        for seed in seeds:
            g = torch.Generator("cpu").manual_seed(seed)
            pipe.set_progress_bar_config(desc=f"  seed {seed}", leave=False, file=sys.stderr)  # the steps
            with torch.no_grad():
                out = pipe(**text, num_inference_steps=args.steps, generator=g, **guide, **extra)
            images.append(out.frames[0] if video else out.images[0])
            bar.update(1)
        rows.append(images)
    bar.close()
    _save(args, rows, seeds, inputs if args.image_pil else None)
    return 0


def _default_size(pipe, comps) -> int:
    """The base's own image size: a U-Net's sample size in pixels, else the pipeline's default (transformers)."""
    sample = getattr(comps.denoiser.config, "sample_size", None)
    if sample is not None and hasattr(comps.vae.config, "block_out_channels"):
        return sample * 2 ** (len(comps.vae.config.block_out_channels) - 1)
    return pipe.default_sample_size * pipe.vae_scale_factor


def _video_inputs(args, comps, init) -> dict:
    """A video base's sampling inputs: size and frames (default: the toy base's own, else Wan's 480p x 81), and
    the first frame for image-to-video."""
    import json

    from finetune.errors import ModelError

    made = Path(comps.source) / "toy_build.json"
    own = json.loads(made.read_text()).get("sampler", {}) if made.is_file() else {}
    frames = args.frames or own.get("frames", 81)
    if (frames - 1) % 4:
        raise ModelError(f"--frames {frames}: video clips have 4k + 1 frames; use {(frames - 1) // 4 * 4 + 1}")
    extra = {"width": args.width or own.get("size", 832), "height": args.height or own.get("size", 480),
             "num_frames": frames, "output_type": "pil"}
    if own.get("max_sequence_length"):
        extra["max_sequence_length"] = own["max_sequence_length"]
    if comps.family.start_image:
        if init is None:
            raise ModelError(f"{args.base}: an image-to-video base; give the first frame with --init-image")
        extra["image"] = init
    return extra


def _save(args, rows, seeds, inputs=None) -> None:
    from finetune.train.validation import edit_grid, grid

    parts = args.lora + args.embedding + ([f"controlnet {Path(args.controlnet).name}"] if args.controlnet else [])
    title = f"{Path(args.base).name} | " + " ".join(Path(s).name for s in parts)
    title = f"{title} | seeds {seeds}"[:200]
    image = edit_grid([inputs] * len(rows), rows, args.prompts, title) if inputs else grid(rows, args.prompts, title)
    _save_image(image, args.out)
    print(f"wrote {args.out}")
    if isinstance(rows[0][0], list):  # clips: an animated GIF beside the frame strips, MP4s on request
        from finetune.eval.video import save_gif, save_mp4

        print(f"wrote {save_gif(rows, args.out.with_suffix('.gif'), args.fps)}")
        for i, row in enumerate(rows if args.save_images else []):
            for seed, clip in zip(seeds, row, strict=True):
                save_mp4(clip, args.save_images / f"p{i:02d}-s{seed}.mp4", args.fps)
        if args.save_images:
            print(f"wrote {sum(len(r) for r in rows)} clips to {args.save_images}")
        return
    if args.save_images:
        for i, row in enumerate(rows):
            for seed, img in zip(seeds, row, strict=True):
                _save_image(img, args.save_images / f"p{i:02d}-s{seed}.png")
        print(f"wrote {sum(len(r) for r in rows)} images to {args.save_images}")


def _check_device(name: str | None) -> None:
    import torch

    from finetune.errors import ModelError

    if name is None:
        return
    try:
        kind = torch.device(name).type
    except RuntimeError:
        raise ModelError(f"--device {name}: not a device name; use cuda, cuda:1, mps or cpu") from None
    there = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}.get(kind, lambda: True)
    if not there():
        raise ModelError(f"--device {name}: no {kind} device here; leave --device out to use what there is")


def _save_image(image, path: Path) -> None:
    """Atomically, so an interrupted run leaves the old file or none, never half an image."""
    from PIL import Image

    from finetune.export.io import atomic_path

    with atomic_path(path) as tmp:
        image.save(tmp, format=Image.registered_extensions()[path.suffix.lower()])


if __name__ == "__main__":
    raise SystemExit(_common.run(main))
