"""How long filling the latent + text caches takes with 1 and with N processes (same files either way).

    python tools/bench_cache.py --images 64 --resolution 256 --processes 1 2

Each count launches `accelerate launch` on CPU processes (gloo) over a folder of drawn images with a fresh
cache, trains one step, and reports the cache fill's wall time on the slowest process and the CPU time
of the busiest process (on a machine with fewer free cores than processes only the CPU time halves).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _timed_main() -> None:
    """Inside each launched process: time the cache fill, then train as usual."""
    from finetune.data import dataset

    fill = dataset._fill_caches

    def timed(*args, **kwargs):
        start, cpu = time.perf_counter(), time.process_time()
        out = fill(*args, **kwargs)
        print(f"BENCH {time.perf_counter() - start:.3f} {time.process_time() - cpu:.3f}", flush=True)
        return out

    dataset._fill_caches = timed
    from finetune.run import main

    main(sys.argv[2:])


def _run(recipe: Path, processes: int, out: Path) -> tuple[float, float]:
    launcher = ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1"] if processes > 1 else \
        ["--num_processes", "1"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--main_process_port", "0",
           "--mixed_precision", "no", "--dynamo_backend", "no", __file__, "--inside", str(recipe),
           f"train.output_dir={out}"]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
    rows = [line.split()[1:] for line in (done.stdout + done.stderr).splitlines() if line.startswith("BENCH ")]
    if done.returncode or len(rows) != processes:
        raise SystemExit(f"the {processes}-process run failed:\n{done.stderr[-3000:]}")
    return max(float(w) for w, _ in rows), max(float(c) for _, c in rows)


def main() -> None:
    if sys.argv[1:2] == ["--inside"]:
        return _timed_main()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()
    import yaml

    from finetune.toy import toy_base_path
    from tests.helpers import draw_images

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = draw_images(tmp / "images", n=args.images, size=args.resolution)
        for i in range(args.images):
            (images / f"{i}.txt").write_text(f"a sks circle, number {i}")
        recipe = {"model": {"base": str(toy_base_path())},
                  "data": {"sources": [{"type": "folder", "path": str(images)}], "resolution": args.resolution,
                           "buckets": {"enabled": False}, "cache_latents": True, "cache_text": True},
                  "method": {"name": "lora", "rank": 4},
                  "train": {"max_steps": 1, "batch_size": args.batch, "checkpoint_every": 0},
                  "validation": {"prompts": [], "at_start": False},
                  "export": {"formats": ["diffusers"], "model_card": False},
                  "logging": {"report_to": [], "progress": False}}
        path = tmp / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        for n in args.processes:
            wall, cpu = _run(path, n, tmp / f"out{n}")
            print(f"{n} process(es): cache fill {wall:.2f} s wall, {cpu:.2f} s CPU on the busiest process")


if __name__ == "__main__":
    main()
