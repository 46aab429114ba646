"""Data-parallel training with 2 CPU processes under `accelerate launch`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from tests.helpers import ROOT, draw_images, write_recipe


def launch(recipe: Path, processes: int, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if processes > 1:
        # plain `--cpu --num_processes 2` silently runs one process; this is the working CPU DDP spelling
        cmd += ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1"]
    else:
        cmd += ["--num_processes", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "finetune" / "run.py"), str(recipe),
            *overrides]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", MASTER_PORT="29517")
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, tiny_base):
    images = draw_images(tmp_path / "images", n=8)
    recipe = write_recipe(tmp_path, tiny_base, images, train={"max_steps": 4, "checkpoint_every": 2})
    two = launch(recipe, 2, f"train.output_dir={tmp_path / 'two'}", "train.batch_size=2")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 processes hold identical weights" in two.stderr + two.stdout
    one = launch(recipe, 1, f"train.output_dir={tmp_path / 'one'}", "train.batch_size=4")
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_file(tmp_path / "two" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "one" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    scale = max(float(b[k].abs().max()) for k in b)
    assert worst < 1e-5 * max(1.0, scale), worst
    # only the main process wrote: one checkpoint folder per step, one grid folder, one export
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step-000002"]
