#!/usr/bin/env python
"""Merge LoRAs: fuse them (with weights) into a base model, or combine several into one LoRA.

    # fuse into the base -> a diffusers folder and/or a single-file checkpoint (ComfyUI / A1111)
    python tools/merge.py fuse --base toy --lora style.safetensors:0.8 --lora subject/ --out merged/ \
        --single-file merged.safetensors
    # several LoRAs (any ranks) -> one: exact (ranks add) or SVD-compressed to a rank / an energy
    python tools/merge.py combine --lora a.safetensors:1.0 --lora b.safetensors:0.5 --out ab.safetensors
    python tools/merge.py combine --lora a.safetensors --lora b.safetensors --rank 16 --out ab16.safetensors

LoRA files may be diffusers or kohya form; `fuse` also takes DoRA, LoHa and LoKr files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import _common


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fuse", help="fuse LoRAs into the base and save a full model")
    _common.add_base_args(f)
    f.add_argument("--lora", action="append", required=True, metavar="PATH[:WEIGHT]", help="LoRA to fuse (repeat)")
    f.add_argument("--out", type=Path, help="diffusers folder to write")
    f.add_argument("--single-file", type=Path, help="single-file .safetensors checkpoint (LDM layout) to write")
    f.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="single-file weights dtype")
    f.add_argument("--overwrite", action="store_true", help="replace existing outputs (never an input)")
    c = sub.add_parser("combine", help="combine LoRAs into one LoRA")
    c.add_argument("--lora", action="append", required=True, metavar="PATH[:WEIGHT]", help="LoRA to add (repeat)")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--rank", type=int, help="SVD-compress the result to this rank")
    g.add_argument("--energy", type=float, help="SVD-compress keeping this fraction of the energy per layer")
    c.add_argument("--out", required=True, type=Path, help="output .safetensors file or folder")
    c.add_argument("--format", choices=["diffusers", "kohya"], default="kohya", help="output form")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output (never an input)")
    c.add_argument("--allow-pickle", action="store_true", help="read .ckpt/.pt/.bin inputs (weights_only=True)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from finetune.export.merge import LoraSpec

    args = parse_args(argv)
    specs = [LoraSpec.parse(s) for s in args.lora]
    return fuse(args, specs) if args.command == "fuse" else combine(args, specs)


def fuse(args, specs) -> int:
    from finetune.errors import ModelError
    from finetune.export.io import check_output
    from finetune.export.merge import merge_into_base

    if args.out is None and args.single_file is None:
        raise ModelError("give --out (diffusers folder) and/or --single-file")
    inputs = [Path(args.base), *(s.path for s in specs)]
    if args.out is not None:
        check_output(args.out, inputs, args.overwrite, "--out", folder=True)
    if args.single_file is not None:
        check_output(args.single_file, inputs, args.overwrite, "--single-file")
    print(f"[1/2] loading the base {args.base}", flush=True)  # each step is minutes for a large base
    comps = _common.load_base(args.base, args.family, args.config, args.allow_pickle)
    print(f"[2/2] fusing {len(specs)} LoRA(s) into it and writing", flush=True)
    for path in merge_into_base(comps, specs, args.out, args.single_file, args.allow_pickle, args.dtype,
                                args.overwrite):
        print(f"wrote {path}")
    return 0


def combine(args, specs) -> int:
    from finetune.errors import ModelError
    from finetune.export.convert import check_lora_output, lora_target
    from finetune.export.lora import save_adapter
    from finetune.export.lowrank import summary
    from finetune.export.merge import combine as combine_loras

    _common.quiet()
    if args.rank is not None and args.rank < 1:
        raise ModelError(f"--rank {args.rank}: must be at least 1")
    _common.check_energy(args.energy)
    target = check_lora_output(lora_target(specs[0].path, args.out, args.format), [s.path for s in specs],
                               args.overwrite)
    merged, reports, meta = combine_loras(specs, args.rank, args.energy, args.allow_pickle)
    if reports:
        meta["finetune.resize_report"] = summary(reports)
        print(summary(reports))
    ranks = sorted({layer.rank for layer in merged.layers.values()})
    print(f"{len(merged.layers)} layers, rank {ranks[0]}..{ranks[-1]}")
    print(f"wrote {save_adapter(merged, target, args.format, meta)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_common.run(main))
