#!/usr/bin/env python
"""Captions/s of the captioning tool's models on this machine (docs/captioning.md records the results).

    python tools/bench_caption.py                       # tiny model + Florence-2-base shape, CPU
    python tools/bench_caption.py --device cuda --batch 1 8 --images 32
    python tools/bench_caption.py --model florence-community/Florence-2-base   # a downloaded checkpoint

Random-weight models run every caption to exactly --tokens new tokens with --beams beams (Florence-2 ships
with 3), so the time is the real model's; only the words are noise.
"""

from __future__ import annotations

import argparse
import tempfile

import _common


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", help="a real checkpoint to time instead of the built-in shapes")
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes to time")
    p.add_argument("--images", type=int, default=4, help="captions timed per configuration")
    p.add_argument("--tokens", type=int, default=20, help="new tokens per caption (a short caption is ~15-25)")
    p.add_argument("--beams", type=int, default=3, help="beam count (Florence-2's generation config uses 3)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--skip-tiny", action="store_true", help="leave out the tiny model")
    return p.parse_args(argv)


def main(argv=None) -> int:
    import torch

    from finetune.caption.bench import HEADER, florence2_base_captioner, time_captioner
    from finetune.caption.build import build_tiny_florence
    from finetune.caption.models import load_captioner

    args = parse_args(argv)
    _common.quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [HEADER]
    with tempfile.TemporaryDirectory() as tmp:
        subjects = []
        if args.model:
            subjects.append((args.model, lambda: load_captioner(args.model, args.device, args.dtype)))
        else:
            if not args.skip_tiny:
                subjects.append(("tiny Florence-2 (tests)",
                                 lambda: load_captioner(str(build_tiny_florence(f"{tmp}/tiny")), args.device, args.dtype)))
            subjects.append(("Florence-2-base shape, random", lambda: florence2_base_captioner(args.device, args.dtype)))
        for name, make in subjects:
            captioner = make()
            for batch in args.batch:
                result = time_captioner(captioner, name, args.images, batch, args.tokens, args.beams)
                rows.append(result.row())
                print(rows[-1], flush=True)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(_common.run(main))
