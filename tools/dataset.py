#!/usr/bin/env python
"""Check a folder of training images before training on it, and optionally move the offenders aside.

    python tools/dataset.py photos/                          # report only; reads, writes nothing
    python tools/dataset.py photos/ --resolution 1024 --tokenizer stabilityai/stable-diffusion-xl-base-1.0
    python tools/dataset.py photos/ --fix                    # move offenders to photos-quarantine/
    python tools/dataset.py photos/ --fix --only duplicate,near-duplicate --quarantine /tmp/q

Finds unreadable images, exact duplicates, near duplicates (re-encoded or resized copies: perceptual hashes
confirmed by thumbnails), images the training resolution must upscale, extreme aspect ratios, missing or
empty captions, and captions longer than the text encoder's window (CLIP: 77 tokens), with the words lost.
--fix moves images (with their caption files) into <quarantine>/<problem>/ and logs every move in
<quarantine>/quarantine.log; it never deletes and never overwrites. Missing captions are not moved:
tools/caption.py writes them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import _common


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("folder", type=Path, help="folder of images with caption files")
    p.add_argument("--resolution", type=int, default=512, help="training resolution (default 512)")
    p.add_argument("--max-aspect", type=float, default=2.5, help="long/short side ratio beyond which to report")
    p.add_argument("--near-rms", type=float, default=10.0,
                   help="thumbnail RMS difference (of 255) under which look-alikes count as near duplicates; 0: off")
    p.add_argument("--tokenizer", default="toy",
                   help="whose tokenizer counts caption tokens: a diffusers base (folder or hub id), a tokenizer "
                        "folder, or 'toy' (CLIP's vocabulary; default)")
    p.add_argument("--max-tokens", type=int, help="text window in tokens (default: the tokenizer's, 77 for CLIP)")
    p.add_argument("--caption-ext", default=".txt", help="caption file extension (default .txt)")
    p.add_argument("--recursive", action="store_true", help="include images in sub-folders")
    p.add_argument("--fix", action="store_true", help="move offenders (and their captions) to the quarantine folder")
    p.add_argument("--only", help="comma-separated problem kinds --fix moves (default: all but missing captions)")
    p.add_argument("--quarantine", type=Path, help="where --fix moves files (default: <folder>-quarantine next to it)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from finetune.data.hygiene import FIXABLE, KINDS, HygieneOptions, check_folder, format_report
    from finetune.data.quarantine import default_quarantine, quarantine
    from finetune.errors import DataError

    args = parse_args(argv)
    kinds = FIXABLE
    if args.only:
        kinds = tuple(k.strip() for k in args.only.split(",") if k.strip())
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise DataError(f"--only {unknown[0]}: not a problem kind; one of {', '.join(KINDS)}")
    opts = HygieneOptions(resolution=args.resolution, max_aspect=args.max_aspect, near_rms=args.near_rms,
                          tokenizer=args.tokenizer, max_tokens=args.max_tokens, caption_ext=args.caption_ext,
                          recursive=args.recursive)
    report = check_folder(args.folder, opts, progress=not args.json)
    dest = args.quarantine or default_quarantine(report.folder)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(format_report(report, kinds, str(dest)))
    if args.fix:
        moves = quarantine(report, dest, kinds)
        images = len({m.src for m in moves} & set(report.offenders(kinds)))
        print(f"moved {images} image(s), {len(moves)} file(s) in all, to {dest} (log: {dest / 'quarantine.log'})"
              if moves else "nothing to move")
    return 0


if __name__ == "__main__":
    raise SystemExit(_common.run(main))
