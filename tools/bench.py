#!/usr/bin/env python3
"""Benchmark training: steps/s, images/s, peak memory and the share of each step per phase.

    python tools/bench.py                                   # toy base, every variant, batch 8
    python tools/bench.py --model sd15 --batch 1 4 --precision bf16 --variants latent+text-cache
    python tools/bench.py --model toy --quantize nf4        # QLoRA: nf4 / int8 / fp8 frozen weights
    python tools/bench.py --model flux-tiny --variants grad-checkpointing --block-swap 2   # vs --block-swap 0
    python tools/bench.py --out output/bench                # JSON + Markdown table land there

Each configuration runs in its own process after a warm-up; only the measured steps count.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.bench import PHASES, RESOLUTION, VARIANTS, base_recipe, run_child, time_bad_recipe  # noqa: E402
from finetune.recipe import deep_merge  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=list(RESOLUTION), default="toy",
                   help="base to train (toy; flux-tiny, sd3-tiny: tiny transformers; sd15, sdxl, sd35m: public "
                   "configs with random weights, use a GPU)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--batch", nargs="+", type=int, default=None, help="batch sizes (default 8 toy, 1 sd15)")
    p.add_argument("--steps", type=int, default=20, help="measured steps")
    p.add_argument("--warmup", type=int, default=5, help="steps before measuring (>= 1)")
    p.add_argument("--precision", choices=["no", "bf16", "fp16"], default="no")
    p.add_argument("--rank", type=int, default=16)
    from finetune.kinds import registered_kinds

    p.add_argument("--adapter", choices=sorted(registered_kinds()), default="lora", help="adapter kind")
    p.add_argument("--quantize", choices=["none", "nf4", "int8", "fp8"], default="none",
                   help="model.quantize for every variant (the bare reference stays unquantized)")
    p.add_argument("--block-swap", type=int, default=0, metavar="N",
                   help="train.block_swap for every variant (turns on gradient checkpointing; flux-tiny, sd3-tiny)")
    p.add_argument("--no-bare", action="store_true", help="skip the bare denoiser reference measurement")
    p.add_argument("--out", type=Path, default=Path("output/bench"), help="folder for results.json / results.md")
    return p.parse_args()


def table(rows: list[dict]) -> str:
    head = ["config", "batch", "s/step", "steps/s", "img/s", "peak host MiB", "peak GPU MiB", "swap copies MiB/step",
            "first step s",
            *[f"{p} %" for p in PHASES]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r.get('batch', '')} | error: {' '.join(r['error'])} |")
            continue
        phases = r.get("phases_s", {})
        shares = [f"{100 * phases.get(p, 0) / r['step_s']:.1f}" if phases else "" for p in PHASES]
        lines.append("| " + " | ".join([
            r["name"], str(r["batch"]), f"{r['step_s']:.4f}", f"{1 / r['step_s']:.2f}",
            f"{r['batch'] / r['step_s']:.1f}", f"{r.get('peak_host_mib', 0):.0f}",
            f"{r['peak_gpu_mib']:.0f}" if "peak_gpu_mib" in r else "-",
            f"{r['swap_copied_mib_per_step']:.2f}" if "swap_copied_mib_per_step" in r else "-",
            f"{r['time_to_first_step_s']:.1f}" if "time_to_first_step_s" in r else "-", *shares,
        ]) + " |")
    return "\n".join(lines)


def main() -> None:
    args = parse()
    if args.warmup < 1:
        sys.exit("error: --warmup must be at least 1")
    batches = args.batch or ([8] if args.model == "toy" else [1])
    rows = []
    for batch in batches:
        base = base_recipe(args.model, batch, args.warmup + args.steps, args.precision, args.rank, args.adapter,
                           args.quantize, args.block_swap)
        if not args.no_bare:
            bare = deep_merge(base, {"model": {"quantize": "none"}, "train": {"block_swap": 0}})
            r = run_child("bare", bare, args.warmup, args.steps)
            rows.append({"name": "bare denoiser fwd+bwd+opt", **r})
            print(f"bare denoiser, batch {batch}: {r.get('step_s', float('nan')):.4f} s/step", flush=True)
        for variant in args.variants:
            r = run_child("train", deep_merge(base, VARIANTS[variant]), args.warmup, args.steps)
            name = variant + suffix(args)
            rows.append({"name": name, "batch": batch, **r})
            print(f"{name}, batch {batch}: {json.dumps(r)}", flush=True)
    reject = time_bad_recipe()
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "quantize": args.quantize, "block_swap": args.block_swap,
            "precision": args.precision, "rank": args.rank, "adapter": args.adapter,
            "steps": args.steps, "warmup": args.warmup, "bad_recipe_rejected_s": reject, "machine": machine(),
            "date": time.strftime("%Y-%m-%d")}
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    md = f"{table(rows)}\n\nbad recipe rejected in {reject:.2f} s; machine: {meta['machine']}\n"
    (args.out / "results.md").write_text(md)
    print(md)


def suffix(args) -> str:
    """What the row's run adds to its variant: ' [nf4]', ' [block swap 2]'."""
    parts = ([args.quantize] if args.quantize != "none" else []) + (
        [f"block swap {args.block_swap}"] if args.block_swap else [])
    return f" [{', '.join(parts)}]" if parts else ""


def machine() -> str:
    import os
    import platform

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}"


if __name__ == "__main__":
    main()
