#!/usr/bin/env python
"""Say what a safetensors file is: format, family, method, ranks, targets, trigger words, metadata.

    python tools/inspect_file.py out/run/my_lora.safetensors
    python tools/inspect_file.py out/ti/learned_embeds.safetensors --json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import _common

LONG = ("finetune.recipe", "lora_adapter_metadata", "finetune.peft_config", "ss_tag_frequency", "finetune.modules")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("input", type=Path, help="a .safetensors file (or a diffusers LoRA / model folder)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--all", action="store_true", help="print long metadata values (the recipe) in full")
    p.add_argument("--allow-pickle", action="store_true", help="read .ckpt/.pt/.bin files (weights_only=True)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from finetune.export.describe import describe_file

    args = parse_args(argv)
    _common.quiet()
    info = describe_file(args.input, allow_pickle=args.allow_pickle)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    meta = info.pop("metadata", {})
    for key, value in info.items():
        print(f"{key:>14}: {value}")
    if meta:
        print("      metadata:")
        for key in sorted(meta):
            value = meta[key]
            if key in LONG and not args.all and len(value) > 100:
                value = value[:97] + "..."
            print(f"    {key} = {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_common.run(main))
