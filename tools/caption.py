#!/usr/bin/env python
"""Caption a folder of training images with a vision-language model: one .txt per image, no typing.

    python tools/caption.py photos/                                  # short sentences (Florence-2-base)
    python tools/caption.py photos/ --style tags                     # comma-separated tags (SmolVLM-256M)
    python tools/caption.py photos/ --trigger sks --class-word dog   # "a dog on grass" -> "a sks dog on grass"
    python tools/caption.py photos/ --prefix "photo of sks dog, " --dry-run --limit 4   # preview, write nothing
    python tools/caption.py photos/ --model Qwen/Qwen2.5-VL-3B-Instruct --style detailed --batch-size 16

Images that already have a caption file are skipped (--overwrite replaces them); every file is written
atomically, so Ctrl-C / SIGTERM leave no half-written caption: run the command again to continue.
Models: any image-text-to-text model transformers supports natively (never trust_remote_code); see
--list-models and docs/captioning.md. Check the set afterwards with tools/dataset.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import _common


def parse_args(argv=None) -> argparse.Namespace:
    from finetune.caption.models import STYLES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("folder", type=Path, nargs="?", help="folder of images; captions go next to them")
    p.add_argument("--model", help="hub id or local folder (default: Florence-2-base; SmolVLM-256M for tags)")
    p.add_argument("--style", default="short", choices=STYLES, help="short sentence, a few detailed sentences, or tags")
    p.add_argument("--prefix", default="", help='put before every caption, verbatim, e.g. "photo of sks dog, "')
    p.add_argument("--suffix", default="", help="put after every caption, verbatim")
    p.add_argument("--trigger", help="trigger word of the subject, put before its class word (or in front)")
    p.add_argument("--class-word", action="append", default=[], dest="class_words",
                   help="class word the trigger goes before ('a dog' -> 'a sks dog'); repeat for synonyms")
    p.add_argument("--overwrite", action="store_true", help="replace existing caption files")
    p.add_argument("--fill-empty", action="store_true", help="also caption images whose caption file is empty")
    p.add_argument("--dry-run", action="store_true", help="caption and print what would be written; write nothing")
    p.add_argument("--limit", type=int, help="stop after this many captions (a preview)")
    p.add_argument("--batch-size", type=int, default=8, help="images per generate call (default 8)")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="compute dtype (auto: bf16/fp16 on GPUs, fp32 on CPUs)")
    p.add_argument("--max-new-tokens", type=int, help="cap on generated tokens (default: by style)")
    p.add_argument("--recursive", action="store_true", help="also caption images in sub-folders")
    p.add_argument("--caption-ext", default=".txt", help="caption file extension (default .txt)")
    p.add_argument("--quiet", action="store_true", help="no per-image lines, no progress bar")
    p.add_argument("--list-models", action="store_true", help="print the documented models and exit")
    args = p.parse_args(argv)
    if args.folder is None and not args.list_models:
        p.error("the folder is required")
    return args


def list_models() -> str:
    from finetune.caption.models import DEFAULT_MODELS, KNOWN_MODELS

    rows = [f"{'model':40s} {'size':6s} {'styles':22s} notes"]
    rows += [f"{m:40s} {size:6s} {styles:22s} {note}" for m, size, styles, note in KNOWN_MODELS]
    rows.append("defaults: " + ", ".join(f"{s} -> {m}" for s, m in DEFAULT_MODELS.items()))
    return "\n".join(rows)


def _quiet() -> None:
    """transformers' chatter off through its environment switches, read when it is first imported: importing it
    here would cost seconds before a bad folder or an unreachable model is reported."""
    import os
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(argv=None) -> int:
    from finetune.caption import CaptionOptions, caption_folder, summary

    args = parse_args(argv)
    if args.list_models:
        print(list_models())
        return 0
    opts = CaptionOptions(
        model=args.model, style=args.style, prefix=args.prefix, suffix=args.suffix, trigger=args.trigger,
        class_words=tuple(args.class_words), overwrite=args.overwrite, fill_empty=args.fill_empty,
        dry_run=args.dry_run, limit=args.limit, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
        max_new_tokens=args.max_new_tokens, recursive=args.recursive, caption_ext=args.caption_ext,
    )
    _quiet()
    echo = None if args.quiet else (lambda line: print(line, flush=True))
    result = caption_folder(args.folder, opts, progress=not args.quiet, echo=echo)
    print(summary(result, opts))
    return 0


if __name__ == "__main__":
    raise SystemExit(_common.run(main))
