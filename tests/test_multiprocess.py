"""Data-parallel training with 2 CPU processes under `accelerate launch`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.helpers import LAYOUT_EXPORT, ROOT, layout_recipe, max_difference, run_trainer


def launch(recipe: Path, processes: int, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if processes > 1:
        # plain `--cpu --num_processes 2` silently runs one process; this is the working CPU DDP spelling
        cmd += ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1"]
        # a free port, not accelerate's default 29500: another run on the same machine would share the
        # rendezvous and leave a rank waiting forever
        cmd += ["--main_process_port", "0"]
    else:
        cmd += ["--num_processes", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "finetune" / "run.py"), str(recipe),
            *overrides]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    # its own process group: on a timeout the ranks go too, not only the launcher
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"the launch did not finish in 600 s:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.parametrize("kind", ["plain", "prior", "ti"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, tiny_base, kind):
    """2 processes at batch 2 train what 1 process at batch 4 trains: plain LoRA, with prior preservation, and
    Textual Inversion whose empty captions get templates drawn per example."""
    recipe = layout_recipe(tmp_path, tiny_base, kind, checkpoint_every=2)
    two = launch(recipe, 2, f"train.output_dir={tmp_path / 'two'}", "train.batch_size=2")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 processes hold identical weights" in two.stderr + two.stdout
    # the one-process reference runs in this process (a launch of one process adds only start-up time)
    run_trainer(recipe, f"train.output_dir={tmp_path / 'one'}", "train.batch_size=4")
    file = LAYOUT_EXPORT[kind]
    scale = max(float(v.abs().max()) for v in load_file(tmp_path / "one" / file).values())
    assert max_difference(tmp_path / "two" / file, tmp_path / "one" / file) < 1e-5 * max(1.0, scale)
    # only the main process wrote: one checkpoint folder per step, one grid folder, one export
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step-000002"]
