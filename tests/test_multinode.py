"""Two "machines" on one host (two launcher groups, one process each, meeting on the loopback address), and
how a multi-process job ends when one process fails: every process stops, soon, with the error, and none is
left behind."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.helpers import (
    DDP_CPU,
    ROOT,
    finish_launch,
    free_port,
    layout_recipe,
    max_difference,
    run_trainer,
    start_launch,
    wait_gone,
)

LORA = "pytorch_lora_weights.safetensors"


def two_machines(recipe: Path, *overrides: str, env: dict | None = None, script: Path | None = None):
    """Launch machine 1 and machine 0 (2 processes in all); returns both Popen objects."""
    port = str(free_port())
    procs = []
    for rank in (1, 0):
        launcher = ["--multi_gpu", "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                    "--main_process_ip", "127.0.0.1", "--main_process_port", port, "--rdzv_backend", "static"]
        procs.append(start_launch(recipe, launcher, *overrides, env=env, script=script))
    return procs[1], procs[0]


@pytest.mark.slow
def test_two_machines_on_loopback_train_what_one_process_trains(tmp_path, tiny_base):
    recipe = layout_recipe(tmp_path, tiny_base, "plain", checkpoint_every=2)
    main, other = two_machines(recipe, f"train.output_dir={tmp_path / 'two'}", "train.batch_size=2")
    done = [finish_launch(p, timeout=420) for p in (main, other)]
    assert [d.returncode for d in done] == [0, 0], done[0].stderr[-2000:] + done[1].stderr[-2000:]
    assert "2 processes on 2 machines, data parallel" in done[0].stdout + done[0].stderr
    # only the global main process (machine 0) writes and reports; machine 1 says nothing of files
    assert "wrote " in done[0].stdout + done[0].stderr
    assert "wrote " not in done[1].stdout + done[1].stderr and "checkpoint:" not in done[1].stdout + done[1].stderr
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step-000002"]
    run_trainer(recipe, f"train.output_dir={tmp_path / 'one'}", "train.batch_size=4")
    diff = max_difference(tmp_path / "two" / LORA, tmp_path / "one" / LORA)
    print(f"2 machines vs 1 process: max |difference| {diff:.3g}")
    assert diff < 1e-5


FAULTS = {
    # a bad image on machine 1's process, as `on_bad_image: error` raises it, mid-run
    "data": ("1:data:2", "cannot decode the image (injected)"),
    # the main process finds the disk full at the step-2 checkpoint while the other waits at the barrier
    "disk": ("0:disk", "not enough disk space for a checkpoint"),
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_one_failing_process_ends_the_whole_job_with_its_error(tmp_path, tiny_base, fault):
    where, message = FAULTS[fault]
    recipe = layout_recipe(tmp_path, tiny_base, "plain", checkpoint_every=2, max_steps=6)
    mark = tmp_path / "fault.mark"
    env = {"FINETUNE_TEST_FAULT": where, "FINETUNE_TEST_FAULT_MARK": str(mark)}
    procs = two_machines(recipe, f"train.output_dir={tmp_path / 'out'}", env=env, script=ROOT / "tests" / "fault_run.py")
    done = [finish_launch(p, timeout=420) for p in procs]
    ended = time.time()
    assert mark.is_file(), done[0].stderr[-3000:]
    took = ended - float(mark.read_text())
    print(f"{fault}: every process ended {took:.1f} s after the fault")
    assert all(d.returncode != 0 for d in done)
    assert any(line.startswith("error: ") and message in line for d in done for line in d.stderr.splitlines())
    assert took < 60
    assert [wait_gone(p, 5) for p in procs] == [[], []]  # no orphan rank on either "machine"
    assert not (tmp_path / "out" / LORA).exists()


@pytest.mark.slow
def test_a_process_that_stops_answering_ends_the_job_after_the_barrier_timeout(tmp_path, tiny_base):
    recipe = layout_recipe(tmp_path, tiny_base, "plain", max_steps=6)
    mark = tmp_path / "fault.mark"
    env = {"FINETUNE_TEST_FAULT": "1:hang:2", "FINETUNE_TEST_FAULT_MARK": str(mark)}
    proc = start_launch(recipe, DDP_CPU, f"train.output_dir={tmp_path / 'out'}", "train.barrier_timeout=15",
                        env=env, script=ROOT / "tests" / "fault_run.py")
    done = finish_launch(proc, timeout=420)
    took = time.time() - float(mark.read_text())
    print(f"hang: the job ended {took:.1f} s after the process stopped answering (barrier_timeout 15 s)")
    assert done.returncode != 0
    assert "error: lost contact with another process" in done.stderr
    # the timeout, then torchrun's grace period for the hung process (SIGTERM, 30 s, SIGKILL)
    assert 15 <= took < 15 + 30 + 45
    assert wait_gone(proc, 5) == []
