#!/usr/bin/env python3
"""Benchmark training: steps/s, images/s, peak memory and the share of each step per phase.

    python tools/bench.py                                   # toy base, every variant, batch 8
    python tools/bench.py --model sd15 --batch 1 4 --precision bf16 --variants latent+text-cache
    python tools/bench.py --model toy --quantize nf4        # QLoRA: nf4 / int8 / fp8 frozen weights
    python tools/bench.py --model flux-tiny --variants grad-checkpointing --block-swap 2   # vs --block-swap 0
    python tools/bench.py --out output/bench                # JSON + Markdown table land there
    python tools/bench.py --profile --variants latent+text-cache   # host syncs per step + a Chrome trace
    python tools/bench.py --noise                           # per-example noise: CPU + pinned copy vs GPU
    python tools/bench.py --collect output/gpu_bench        # one table from several results.json
    python tools/bench.py --metrics                         # seconds to score a validation grid (DreamBench)

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

from finetune.bench import (  # noqa: E402
    PHASES,
    RESOLUTION,
    TOYS,
    VARIANTS,
    base_recipe,
    noise_paths,
    run_child,
    time_bad_recipe,
)
from finetune.recipe import deep_merge  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=list(RESOLUTION), default="toy",
                   help="base to train (toy, toy-flux: the shipped toy bases; flux-tiny, sd3-tiny: tiny transformers; sd15, sdxl, sd35m: public "
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
    p.add_argument("--profile", action="store_true",
                   help="run the measured steps under torch.profiler: host syncs per step, trace-*.json in --out")
    p.add_argument("--noise", action="store_true", help="only time the per-example noise paths, then exit")
    p.add_argument("--collect", type=Path, nargs="+", default=None,
                   help="only print one table from the results.json under these folders, then exit")
    p.add_argument("--metrics", action="store_true", help="instead: time CLIP-I/CLIP-T/DINO on one validation "
                   "grid (25 prompts x 4 seeds, DreamBench-sized models) in fp32 and, on a GPU, bf16/fp16")
    p.add_argument("--recipe", type=Path, default=None,
                   help="start every variant from this recipe (with --set overrides) instead of --model's")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of --recipe")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in each run (1 makes CPU seconds per step comparable on a shared machine)")
    p.add_argument("--repeat", type=int, default=1, help="runs per configuration: the median and the spread")
    p.add_argument("--budget", type=float, default=None, metavar="S",
                   help="skip the configurations left once S seconds have passed (a fixed device slot)")
    p.add_argument("--dry-run", action="store_true", help="print each configuration's recipe and run nothing")
    p.add_argument("--step-memory", action="store_true", help="instead: peak bytes of a full fine-tuning step with "
                   "and without train.optimizer_in_backward (meta device for sd15/sdxl/flux-dev, real for tiny ones)")
    return p.parse_args()


def table(rows: list[dict]) -> str:
    head = ["config", "batch", "s/step", "CPU s/step", "x bare", "steps/s", "img/s", "peak host MiB", "peak GPU MiB",
            "swap H2D MiB/step", "recompiles after step 2", "first step s", *[f"{p} %" for p in PHASES],
            "host reads/step", "GPU syncs/step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    # the floor of each run and batch (rows of one run share the name's "model ...:" prefix in --collect)
    floor = {(r["name"].rpartition(":")[0], r.get("batch")): r for r in rows
             if r["name"].endswith("bare denoiser fwd+bwd+opt") and "step_s" in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r.get('batch', '')} | error: {' '.join(r['error'])} |")
            continue
        phases = r.get("phases_s", {})
        shares = [f"{100 * phases.get(p, 0) / r['step_s']:.1f}" if phases else "" for p in PHASES]
        prof = r.get("profile") or {}
        syncs = prof.get("sync_warnings_per_step")
        lines.append("| " + " | ".join([
            r["name"], str(r["batch"]), f"{r['step_s']:.4f}", _cpu(r), _ratio(r, floor), f"{1 / r['step_s']:.2f}",
            f"{r['batch'] / r['step_s']:.1f}", f"{r.get('peak_host_mib', 0):.0f}",
            f"{r['peak_gpu_mib']:.0f}" if "peak_gpu_mib" in r else "-",
            f"{r['swap_copied_mib_per_step']:.2f}" if "swap_copied_mib_per_step" in r else "-",
            str(r["recompiles_after_step_2"]) if "recompiles_after_step_2" in r else "-",
            f"{r['time_to_first_step_s']:.1f}" if "time_to_first_step_s" in r else "-", *shares,
            f"{prof['host_reads_per_step']:.2f}" if prof else "", f"{syncs:.2f}" if syncs is not None else "",
        ]) + " |")
    return "\n".join(lines)


def _cpu(row: dict) -> str:
    """CPU seconds per step; with --repeat, the median and the runs' range."""
    if "cpu_s_per_step" not in row:
        return "-"
    runs = [c for c in row.get("runs_cpu_s_per_step") or [] if c is not None]
    spread = f" ({min(runs):.4f}-{max(runs):.4f})" if len(runs) > 1 else ""
    return f"{row['cpu_s_per_step']:.4f}{spread}"


def _ratio(row: dict, floor: dict) -> str:
    """Step time over the bare denoiser's: in CPU seconds when both have them (a shared machine), else wall."""
    bare = floor.get((row["name"].rpartition(":")[0], row.get("batch")))
    if not bare:
        return ""
    key = "cpu_s_per_step" if "cpu_s_per_step" in row and "cpu_s_per_step" in bare else "step_s"
    return f"{row[key] / bare[key]:.2f}"


def collect(folders: list[Path]) -> str:
    """One table over several runs (tools/gpu_bench.sh): each row named by its folder."""
    rows = []
    for folder in folders:
        for path in sorted(folder.rglob("results.json")):
            data = json.loads(path.read_text())
            meta = data["meta"]
            tag = f"{path.parent.name} ({meta['model']} {meta['adapter']} r{meta['rank']} {meta['precision']})"
            rows += [{**r, "name": f"{tag}: {r['name']}"} for r in data["rows"]]
    return table(rows)


def main() -> None:
    args = parse()
    if args.collect:
        print(collect(args.collect))
        return
    if args.noise:
        for row in noise_paths():
            print(json.dumps(row), flush=True)
        return
    if args.metrics:
        return bench_metrics(args.out)
    if args.step_memory:
        return step_memory(args)
    if args.warmup < 1:
        sys.exit("error: --warmup must be at least 1")
    start, rows = time.perf_counter(), []
    for batch, name, kind, recipe in configurations(args):
        if args.dry_run:
            print(f"{name}, batch {batch} ({kind}): {json.dumps(recipe)}", flush=True)
            continue
        if args.budget and time.perf_counter() - start > args.budget:
            rows.append({"name": name, "batch": batch, "error": [f"skipped: past the {args.budget:.0f} s budget"]})
            continue
        left = args.budget - (time.perf_counter() - start) + 60 if args.budget else 3600
        runs = [run_child(kind, recipe, args.warmup, args.steps, timeout=left, threads=args.threads,
                          profile=_trace(args, name, batch, kind)) for _ in range(args.repeat)]
        rows.append({"name": name, "batch": batch, **median_run(runs)})
        print(f"{name}, batch {batch}: {json.dumps(rows[-1])}", flush=True)
    if args.dry_run:
        return
    reject = time_bad_recipe()
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"model": str(args.recipe or args.model), "quantize": args.quantize, "block_swap": args.block_swap,
            "precision": args.precision, "rank": args.rank, "adapter": args.adapter, "steps": args.steps,
            "warmup": args.warmup, "repeat": args.repeat, "threads": args.threads, "profile": args.profile,
            "bad_recipe_rejected_s": reject, "machine": machine(), "date": time.strftime("%Y-%m-%d")}
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    md = f"{table(rows)}\n\nbad recipe rejected in {reject:.2f} s; machine: {meta['machine']}\n"
    (args.out / "results.md").write_text(md)
    print(md)


def configurations(args):
    """(batch, row name, 'bare' or 'train', recipe) for every run, the bare floor first in each batch."""
    for batch in args.batch or ([8] if args.model in TOYS else [1]):
        if args.recipe:
            from finetune.recipe import load_recipe

            base = load_recipe(args.recipe, [*args.set, f"train.batch_size={batch}",
                                             f"train.max_steps={args.warmup + args.steps}"]).resolved()
        else:
            base = base_recipe(args.model, batch, args.warmup + args.steps, args.precision, args.rank,
                               args.adapter, args.quantize, args.block_swap, build=not args.dry_run)
        if not args.no_bare:
            yield batch, "bare denoiser fwd+bwd+opt", "bare", deep_merge(
                base, {"model": {"quantize": "none"}, "train": {"block_swap": 0}})
        for variant in args.variants:
            yield batch, variant + suffix(args), "train", deep_merge(base, VARIANTS[variant])


def _trace(args, name: str, batch: int, kind: str):
    return args.out / f"trace-{name.split(' ')[0]}-b{batch}.json" if args.profile and kind == "train" else None


def median_run(runs: list[dict]) -> dict:
    """The run with the median CPU time per step, with every run's wall and CPU seconds beside it."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[0]
    good.sort(key=lambda r: r.get("cpu_s_per_step", r["step_s"]))
    out = dict(good[len(good) // 2])
    if len(runs) > 1:
        out["runs_step_s"] = [r["step_s"] for r in good]
        out["runs_cpu_s_per_step"] = [r.get("cpu_s_per_step") for r in good]
    return out


def step_memory(args) -> None:
    """Peak bytes of whole full-fine-tuning steps, ordinary vs optimizer-in-backward (finetune/memory/step.py)."""
    from finetune.memory.step import step_peaks
    from finetune.recipe import validate

    base = base_recipe(args.model, (args.batch or [1])[0], 2, args.precision, args.rank, args.adapter)
    base["method"] = {"name": "full"}  # full fine-tuning: the adapter keys do not apply
    recipe = validate(deep_merge(base, {"train": {"max_grad_norm": None}}))
    device = "cpu" if args.model in (*TOYS, "flux-tiny", "sd3-tiny") else "meta"
    peaks = step_peaks(recipe, device=device)
    mib = {k: v / 2**20 for k, v in peaks.items() if k != "trained_tensors"}
    print(f"{args.model} full fine-tune, {RESOLUTION[args.model]} px, batch {recipe.train.batch_size}, "
          f"{args.precision} ({device} device): step peak above resident weights {mib['ordinary']:.1f} MiB "
          f"ordinary, {mib['in_backward']:.1f} MiB with train.optimizer_in_backward "
          f"(-{100 * (1 - peaks['in_backward'] / peaks['ordinary']):.0f}%); gradients {mib['gradient_bytes']:.1f} MiB "
          f"over {peaks['trained_tensors']} tensors")


def bench_metrics(out: Path) -> None:
    import torch

    from finetune.eval import bench

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = [torch.float32, torch.bfloat16, torch.float16] if device == "cuda" else [torch.float32]
    rows = [bench.measure(out / "metric-models", device, dt) for dt in dtypes]
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    md = f"{bench.table(rows)}\n\nmachine: {machine()}\n"
    (out / "metrics.md").write_text(md)
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
