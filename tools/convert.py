#!/usr/bin/env python
"""Convert LoRA files between diffusers and kohya (ComfyUI/A1111) form, and embeddings between diffusers
and AUTOMATIC1111 form. Tensors are copied bit-for-bit; metadata is kept.

    python tools/convert.py lora out/run/pytorch_lora_weights.safetensors --to kohya --out my_lora.safetensors
    python tools/convert.py lora my_lora.safetensors --to diffusers --out my_lora_diffusers/
    python tools/convert.py lora out/flux/pytorch_lora_weights.safetensors --to bfl --out my_flux_lora.safetensors
    python tools/convert.py embedding out/ti/learned_embeds.safetensors --to a1111 --out sks.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

import _common


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("kind", choices=["lora", "embedding"], help="what the input file is")
    p.add_argument("input", type=Path, help="file (or diffusers folder) to convert")
    p.add_argument("--to", required=True, choices=["diffusers", "kohya", "bfl", "nextdit", "a1111"],
                   help="output form (bfl: FLUX LoRAs in Black Forest Labs names, for sd-scripts and Forge; nextdit: "
                        "Lumina 2 LoRAs in its original names, q/k/v fused, for ComfyUI and sd-scripts)")
    p.add_argument("--out", required=True, type=Path, help="output file (.safetensors) or folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (never the input)")
    p.add_argument("--allow-pickle", action="store_true", help="read .ckpt/.pt/.bin inputs (weights_only=True)")
    _common.add_family_arg(p, "family whose key names to read and write (auto: from the file)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from finetune.errors import ModelError
    from finetune.export.convert import convert_embedding, convert_lora

    args = parse_args(argv)
    _common.quiet()
    if args.kind == "lora":
        fmt = {"a1111": "kohya"}.get(args.to, args.to)
        path = convert_lora(args.input, args.out, fmt, allow_pickle=args.allow_pickle,
                            family=_common.family_of(args.family), overwrite=args.overwrite)
    else:
        if args.to in ("kohya", "bfl", "nextdit"):
            raise ModelError("embeddings convert to 'diffusers' or 'a1111'")
        path = convert_embedding(args.input, args.out, args.to, allow_pickle=args.allow_pickle,
                                 family=_common.family_of(args.family), overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_common.run(main))
