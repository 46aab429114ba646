#!/usr/bin/env python
"""SVD-resize a LoRA to a lower rank, or to the fewest ranks that keep a fraction of its energy.

    python tools/resize.py my_lora.safetensors --rank 8 --out my_lora_r8.safetensors
    python tools/resize.py my_lora.safetensors --energy 0.99 --out my_lora_small.safetensors

The report gives, per layer and overall, the retained energy (sum of kept squared singular values over the
total) and the relative Frobenius error of the weight delta. At the full rank the result is exact.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import _common


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("input", type=Path, help="LoRA file (diffusers or kohya) or diffusers LoRA folder")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--rank", type=int, help="target rank")
    g.add_argument("--energy", type=float, help="keep this fraction of the energy per layer, e.g. 0.99")
    p.add_argument("--out", required=True, type=Path, help="output .safetensors file or folder")
    p.add_argument("--format", choices=["same", "diffusers", "kohya"], default="same", help="output form")
    p.add_argument("--verbose", action="store_true", help="print every layer's report")
    p.add_argument("--allow-pickle", action="store_true", help="read .ckpt/.pt/.bin inputs (weights_only=True)")
    _common.add_family_arg(p, "family whose key names to read and write (auto: from the file)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from finetune.errors import ModelError
    from finetune.export.adapters import read_adapter
    from finetune.export.convert import kept_metadata, lora_target
    from finetune.export.lora import save_adapter
    from finetune.export.lowrank import resize, summary

    args = parse_args(argv)
    _common.quiet()
    if args.rank is not None and args.rank < 1:
        raise ModelError(f"--rank {args.rank}: must be at least 1")
    adapter = read_adapter(args.input, allow_pickle=args.allow_pickle, family=_common.family_of(args.family))
    small, reports = resize(adapter, rank=args.rank, energy=args.energy)
    fmt = adapter.format if args.format == "same" else args.format
    fmt = "diffusers" if fmt == "peft" else fmt
    ranks = sorted({r.rank_out for r in reports})
    meta = kept_metadata(adapter.metadata) | {
        "finetune.resized_from": f"{args.input.name} (ranks {sorted(adapter.ranks())})",
        "finetune.resize_report": summary(reports), "finetune.rank": str(ranks[-1]),
        "ss_network_dim": str(ranks[-1]), "ss_network_alpha": str(ranks[-1]),
    }
    path = save_adapter(small, lora_target(args.input, args.out, fmt), fmt, meta)
    if args.verbose:
        for r in reports:
            print(f"{r.name}: rank {r.rank_in} -> {r.rank_out}, energy {r.energy:.5f}, error {r.rel_error:.4g}")
    print(summary(reports))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_common.run(main))
