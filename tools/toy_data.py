#!/usr/bin/env python
"""Write part of the toy world to a folder: NNNN.png images with same-stem NNNN.txt captions.

python tools/toy_data.py subject checkered_heart --n 8 --out data/sks_heart --token sks
python tools/toy_data.py class checkered_heart --n 200 --out data/hearts
python tools/toy_data.py world --n 1000 --out data/world --variants
python tools/toy_data.py list
"""

from __future__ import annotations

import os
import sys

# A script in tools/ named like a stdlib module (inspect.py) would shadow it: keep tools/ off the path,
# and put the repository root on it instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import pathlib  # noqa: E402

from finetune.errors import UserError  # noqa: E402
from finetune.toy import world  # noqa: E402

KINDS = {
    "subject": "instance images of a held-out subject",
    "class": "images of the subject's class word, drawn the plain world way (prior images)",
    "world": "captioned world images, as the base model was trained on (no held-out subjects)",
    "list": "print the held-out subjects and exit",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="kinds: " + "; ".join(f"{k}: {v}" for k, v in KINDS.items()),
    )
    p.add_argument("kind", choices=list(KINDS), help="what to write")
    p.add_argument("subject", nargs="?", help="held-out subject name (for 'subject' and 'class')")
    p.add_argument("--out", type=pathlib.Path, help="folder to write (created if missing)")
    p.add_argument("--n", type=int, default=8, help="number of images (default 8)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same images")
    p.add_argument(
        "--token",
        help="for 'subject': caption with this rare token instead of the description, "
        "e.g. --token sks gives 'a sks heart on a white background'",
    )
    p.add_argument("--variants", action="store_true", help="for 'world': short caption variants too")
    return p.parse_args(argv)


def collect(args: argparse.Namespace) -> list:
    if args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}")
    if args.out is None:
        raise UserError("--out is required: the folder to write the images and captions to")
    if args.kind == "world":
        return world.world_images(args.n, seed=args.seed, variants=args.variants)
    if not args.subject:
        raise UserError(f"'{args.kind}' needs a subject name, one of: {', '.join(world.SUBJECTS)}")
    subj = world.get_subject(args.subject)  # DataError with a did-you-mean for an unknown name
    if args.kind == "class":
        return world.class_images(subj.name, args.n, seed=args.seed)
    items = world.subject_images(subj.name, args.n, seed=args.seed)
    if args.token:
        items = [(img, cap.replace(f" {subj.description} ", f" {args.token} ", 1)) for img, cap in items]
    return items


def write(items: list, out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    width = max(4, len(str(len(items) - 1)))
    for i, (img, caption) in enumerate(items):
        img.save(out / f"{i:0{width}d}.png")
        (out / f"{i:0{width}d}.txt").write_text(caption + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.kind == "list":
        for s in world.SUBJECTS.values():
            print(f"{s.name:16s} class '{s.class_word}', caption 'a {s.description} {s.class_word} ...'")
        return 0
    try:
        items = collect(args)
        write(items, args.out)
    except UserError as e:
        print(f"toy_data: error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"wrote {len(items)} images + captions to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
