#!/usr/bin/env python3
"""Cold-start times of the commands a person runs first, and where the seconds go.

    python tools/bench_startup.py                                # this checkout: median of 3 runs, a Markdown table
    python tools/bench_startup.py --only check inspect --repeat 5
    python tools/bench_startup.py --roots /tmp/main-copy .       # before / after, interleaved under the same load

Each command runs in a fresh process, as typed in a shell, with the checkout as its working directory: wall
seconds and CPU seconds (user + system of the process and its children), then once more under
`python -X importtime` for the seconds spent importing (the top-level imports' cumulative times) and whether
torch, diffusers or transformers were imported at all. Launch to first step trains the toy recipe
(`recipes/toy/lora.yaml`, no step-0 grid, a fresh run folder and cache) and stops the clock when the first row
of `logs/loss.csv` appears (it is written after every optimizer step), started with `python -m finetune` and
with `accelerate launch`. A finished one-step toy LoRA is the file `inspect_file.py` reads. Several `--roots`
take turns command by command, so a busy machine slows them alike. `--account` runs the toy trainer once per
checkout with marks from launch to the first step (imports library by library, the trainer's set-up stages, the
step itself), one torch thread, so CPU seconds measure the work even on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PY = sys.executable
HEAVY = ("torch", "diffusers", "transformers")
TOY = "recipes/toy/lora.yaml"
RUN = ["validation.at_start=false", "train.checkpoint_every=0"]
IMPORT_LINE = re.compile(r"import time:\s+\d+ \|\s+(\d+) \| (\s*)(\S+)")


def _env(root: Path) -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(root))


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd: list[str], root: Path) -> tuple[float, float, int]:
    """(wall s, CPU s, exit code) of one run of `cmd`."""
    cpu, start = _children_cpu(), time.perf_counter()
    done = subprocess.run(cmd, cwd=root, env=_env(root), capture_output=True)
    return time.perf_counter() - start, _children_cpu() - cpu, done.returncode


def import_profile(cmd: list[str], root: Path) -> dict:
    """`python -X importtime`: seconds importing and which heavy packages were imported."""
    done = subprocess.run([PY, "-X", "importtime", *cmd[1:]], cwd=root, env=_env(root), capture_output=True,
                          text=True)
    total, seen = 0, set()
    for line in done.stderr.splitlines():
        m = IMPORT_LINE.match(line)
        if m:
            total += int(m.group(1)) if not m.group(2) else 0  # a top-level import holds its children's time
            seen.add(m.group(3).split(".")[0])
    return {"import_s": total / 1e6, "heavy": [h for h in HEAVY if h in seen]}


def first_step(launcher: str, root: Path, out: Path) -> tuple[float, float]:
    """(wall s, CPU s) from launch until step 1's loss row is on disk; the run is then stopped. CPU s counts the
    launched process only (a launcher's own child is not reaped by us): NaN under accelerate."""
    run = [TOY, f"train.output_dir={out}", f"data.cache_dir={out}/cache", *RUN]
    if launcher == "accelerate":
        cmd = [PY, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "finetune/run.py", *run]
    else:
        cmd = [PY, "-m", "finetune", *run]
    loss = out / "logs" / "loss.csv"
    cpu, start = _children_cpu(), time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=root, env=_env(root), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    wall = None
    try:
        while proc.poll() is None:
            if loss.is_file() and len(loss.read_text().splitlines()) > 1:
                wall = time.perf_counter() - start
                break
            time.sleep(0.01)
        else:
            raise SystemExit(f"{' '.join(cmd)} ended ({proc.returncode}) before its first step:\n"
                             + proc.stderr.read().decode()[-2000:])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return wall, (_children_cpu() - cpu) if launcher == "python" else float("nan")


def _account_child(argv: list[str]) -> None:
    """Inside the measured process: train the toy recipe to its first step, printing wall and CPU seconds at each
    mark (imports by library, then the trainer's set-up stages and the first step)."""
    t0, c0 = time.perf_counter(), time.process_time()

    def mark(what: str) -> None:
        print(f"MARK {what}|{time.perf_counter() - t0:.3f}|{time.process_time() - c0:.3f}", flush=True)

    mark("python started")
    import torch  # noqa: F401
    mark("import torch")
    import diffusers.utils  # noqa: F401 (torch._dynamo, and with it inductor and sympy)
    mark("import diffusers (torch._dynamo, inductor)")
    from diffusers import UNet2DConditionModel  # noqa: F401 (quantizers: bitsandbytes; peft, transformers)
    mark("import diffusers models (bitsandbytes, peft, transformers)")
    from finetune.data import dataset
    from finetune.train import trainer
    mark("import finetune trainer")
    _wrap(dataset, "_fill_caches", mark, "set-up: components, method, data scan", "set-up: latent cache fill")
    _wrap(trainer.Trainer, "__init__", mark, None, "set-up: optimizer, accelerate.prepare")
    step = trainer.Trainer.train_step

    def first(self, batch):
        step(self, batch)
        mark("first step")
        raise SystemExit(0)

    trainer.Trainer.train_step = first
    from finetune.run import main

    main(argv)


def _wrap(owner, name: str, mark, before: str | None, after: str) -> None:
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        if before:
            mark(before)
        out = original(*args, **kwargs)
        mark(after)
        return out

    setattr(owner, name, wrapped)


def account(root: Path, out: Path) -> list[tuple[str, float, float]]:
    """(stage, wall s, CPU s) from launch to the first step, one torch thread (CPU seconds then mean work)."""
    env = _env(root) | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([PY, __file__, "--account-child", TOY, f"train.output_dir={out}",
                           f"data.cache_dir={out}/cache", *RUN], cwd=root, env=env, capture_output=True, text=True)
    marks = [line[5:].split("|") for line in done.stdout.splitlines() if line.startswith("MARK ")]
    if not marks or marks[-1][0] != "first step":
        raise SystemExit(f"no first step in {root}:\n{done.stderr[-2000:]}")
    rows, last = [], (0.0, 0.0)
    for stage, wall, cpu in marks:
        rows.append((stage, float(wall) - last[0], float(cpu) - last[1]))
        last = (float(wall), float(cpu))
    return rows


def commands(lora: Path) -> dict[str, list[str]]:
    return {
        "help": [PY, "-m", "finetune", "--help"],
        "check": [PY, "-m", "finetune", TOY, "--check"],
        "estimate": [PY, "-m", "finetune", "estimate", TOY],
        "estimate-flux": [PY, "-m", "finetune", "estimate", "recipes/flux/lora.yaml"],
        "inspect": [PY, "tools/inspect_file.py", str(lora)],
        "studio-help": [PY, "-m", "finetune", "studio", "--help"],
    }


def one_step_lora(root: Path, out: Path) -> Path:
    subprocess.run([PY, "-m", "finetune", TOY, f"train.output_dir={out}", "train.max_steps=1",
                    "validation.prompts=[]", "validation.metrics=[]", "validation.score_subject=null"],
                   cwd=root, env=_env(root), check=True, capture_output=True)
    return out / "pytorch_lora_weights.safetensors"


def measure(names: list[str], roots: list[Path], repeat: int, tmp: Path) -> dict[str, dict[str, dict]]:
    """{command: {root: result}}, the roots taking turns run by run."""
    lora = one_step_lora(roots[0], tmp / "lora") if "inspect" in names else tmp / "none"
    cmds = commands(lora)
    rows: dict[str, dict[str, dict]] = {}
    for name in names:
        runs: dict[Path, list] = {r: [] for r in roots}
        for i in range(repeat):
            for r in roots:
                if name.startswith("first-step"):
                    launcher = "accelerate" if name.endswith("accelerate") else "python"
                    runs[r].append(first_step(launcher, r, tmp / f"{name}-{r.name}-{i}"))
                else:
                    runs[r].append(timed(cmds[name], r)[:2])
        rows[name] = {}
        for r in roots:
            walls, cpus = [w for w, _ in runs[r]], [c for _, c in runs[r]]
            rows[name][str(r)] = {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus),
                                  "runs": walls}
            if name in cmds:
                rows[name][str(r)] |= import_profile(cmds[name], r)
    return rows


def table(rows: dict[str, dict[str, dict]], roots: list[Path]) -> str:
    head = "| command | " + " | ".join(f"{r.name or r}: wall s / CPU s / importing s / heavy imports"
                                       for r in roots) + " |"
    lines = [head, "|---|" + "---|" * len(roots)]
    for name, per in rows.items():
        cells = []
        for r in roots:
            x = per[str(r)]
            imp = f"{x['import_s']:.2f}" if "import_s" in x else "-"
            cells.append(f"{x['wall_s']:.2f} / {x['cpu_s']:.2f} / {imp} / {', '.join(x.get('heavy', [])) or '-'}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def account_table(roots: list[Path], tmp: Path, repeat: int) -> str:
    """Median wall / CPU seconds per stage over `repeat` runs per checkout, the checkouts taking turns."""
    runs: dict[Path, list] = {r: [] for r in roots}
    for i in range(repeat):
        for j, r in enumerate(roots):
            runs[r].append(account(r, tmp / f"account-{j}-{i}"))
    stages = [stage for stage, _, _ in runs[roots[0]][0]]
    med = {r: [(statistics.median(run[k][1] for run in runs[r]), statistics.median(run[k][2] for run in runs[r]))
               for k in range(len(stages))] for r in roots}
    lines = ["| stage (one torch thread) | " + " | ".join(f"{r.name}: wall s / CPU s" for r in roots) + " |",
             "|---|" + "---|" * len(roots)]
    for k, stage in enumerate(stages):
        lines.append(f"| {stage} | " + " | ".join(f"{med[r][k][0]:.2f} / {med[r][k][1]:.2f}" for r in roots) + " |")
    totals = [f"{sum(w for w, _ in med[r]):.2f} / {sum(c for _, c in med[r]):.2f}" for r in roots]
    lines.append("| launch to first step | " + " | ".join(totals) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--account-child"]:
        _account_child(argv[1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [*commands(Path("x")), "first-step", "first-step-accelerate"]
    p.add_argument("--only", nargs="+", choices=names, default=names, help="which measurements")
    p.add_argument("--repeat", type=int, default=3, help="runs per command and checkout; the median is reported")
    p.add_argument("--roots", nargs="+", type=Path, default=[Path(__file__).resolve().parents[1]],
                   help="checkouts to measure, taking turns (default: this one)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--account", action="store_true",
                   help="only say where launch-to-first-step's seconds go (imports by library, set-up stages, step)")
    args = p.parse_args(argv)
    roots = [r.resolve() for r in args.roots]
    if args.account:
        with tempfile.TemporaryDirectory() as tmp:
            print(account_table(roots, Path(tmp), args.repeat))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure([n for n in names if n in args.only], roots, args.repeat, Path(tmp))
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(table(rows, roots))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
