"""Checkpoints you can trust: kills, signals, damaged checkpoints, NaN policy and failing disks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.errors import RunError
from tests.helpers import ROOT, draw_images, run_trainer, write_recipe

EXPORT = "pytorch_lora_weights.safetensors"


def start(recipe: Path, *overrides: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "finetune", str(recipe), *overrides], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {path} appeared:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.01)


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def long_recipe(tmp_path_factory, tiny_base):
    tmp = tmp_path_factory.mktemp("long")
    # long enough that a kill lands mid-run; checkpoints every 2 steps, the 3 newest kept; the export is the
    # EMA, updated every 2nd step, so a resume must restore its update count too (EMAModel.state_dict)
    return write_recipe(tmp, tiny_base, draw_images(tmp / "images"),
                        train={"max_steps": 30, "checkpoint_every": 2, "keep_last": 3,
                               "ema": {"enabled": True, "decay": 0.9, "update_every": 2}})


@pytest.fixture(scope="module")
def reference(long_recipe) -> Path:
    out = long_recipe.parent / "ref"
    done = subprocess.run([sys.executable, "-m", "finetune", str(long_recipe), f"train.output_dir={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / EXPORT


def test_sigkill_then_resume_is_bit_identical(tmp_path, long_recipe, reference):
    out = tmp_path / "killed"
    proc = start(long_recipe, f"train.output_dir={out}")
    wait_for(out / "checkpoints" / "step-000004" / "COMPLETE", proc)
    proc.kill()
    proc.wait()
    assert not (out / EXPORT).exists(), "the run finished before it could be killed"
    resumed = subprocess.run([sys.executable, "-m", "finetune", str(long_recipe), f"train.output_dir={out}",
                              "train.resume=latest"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert same_weights(out / EXPORT, reference)


def test_sigterm_checkpoints_and_exits_cleanly_then_resumes(tmp_path, long_recipe, reference):
    out = tmp_path / "term"
    proc = start(long_recipe, f"train.output_dir={out}", "train.checkpoint_every=0")
    wait_for(out / "logs" / "loss.csv", proc)
    while len((out / "logs" / "loss.csv").read_text().splitlines()) < 4:  # a few steps in, mid-epoch
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    text = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, text[-3000:]
    assert "stopped by SIGTERM" in text and f"resume with: python -m finetune --resume {out}\n" in text
    assert not (out / EXPORT).exists()
    (saved,) = list((out / "checkpoints").glob("step-*"))
    step = int(saved.name.split("-")[1])
    assert 3 <= step < 30
    resumed = subprocess.run([sys.executable, "-m", "finetune", "--resume", str(out)],  # the printed command
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert same_weights(out / EXPORT, reference)


def test_damaged_checkpoint_is_skipped_with_a_warning(tmp_path, tiny_base, images):
    from finetune.train.checkpoint import find_resume

    recipe = write_recipe(tmp_path, tiny_base, images, train={"max_steps": 7, "checkpoint_every": 2, "keep_last": 5})
    run_trainer(recipe)
    root = tmp_path / "out" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000004", "step-000006"]
    victim = root / "step-000006" / "trainable.safetensors"
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    (root / "step-000004" / "COMPLETE").unlink()  # never finished
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        assert find_resume(tmp_path / "out", "latest") == root / "step-000002"
    reference = (tmp_path / "out" / EXPORT).read_bytes()
    (tmp_path / "out" / EXPORT).unlink()
    with pytest.warns(UserWarning):
        t = run_trainer(recipe, "train.resume=latest")
    assert t.state.step == 7
    assert same_weights(tmp_path / "out" / EXPORT, _bytes_file(tmp_path / "ref.safetensors", reference))


def _bytes_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def nan_at(step: int):
    from finetune.train.trainer import Trainer

    original = Trainer.compute_loss
    fired = []

    def compute_loss(self, batch):  # one bad batch: the first one of `step`
        loss, logs = original(self, batch)
        if self.state.step + 1 == step and not fired:
            fired.append(batch["paths"])
            loss = loss * float("nan")
        return loss, logs

    return compute_loss


def test_nan_loss_stops_with_the_step_and_files_and_exports_nothing(tmp_path, tiny_base, images, monkeypatch):
    from finetune.train.trainer import Trainer

    monkeypatch.setattr(Trainer, "compute_loss", nan_at(3))
    recipe = write_recipe(tmp_path, tiny_base, images, train={"max_steps": 5, "checkpoint_every": 2})
    with pytest.raises(RunError) as info:
        run_trainer(recipe)
    message = str(info.value)
    assert "step 3: non-finite loss" in message and ".png" in message and "step-000002" in message
    assert not (tmp_path / "out" / EXPORT).exists()


def test_nan_skip_policy_completes_and_counts(tmp_path, tiny_base, images, monkeypatch):
    from finetune.train.trainer import Trainer

    monkeypatch.setattr(Trainer, "compute_loss", nan_at(3))
    recipe = write_recipe(tmp_path, tiny_base, images, train={"max_steps": 5, "on_nan": "skip"})
    t = run_trainer(recipe)
    assert t.state.step == 5 and t.state.nan_skips == 1
    weights = load_file(tmp_path / "out" / EXPORT)
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_failed_checkpoint_write_leaves_the_previous_one_usable(tmp_path, tiny_base, images, monkeypatch):
    from finetune.train import checkpoint

    recipe = write_recipe(tmp_path, tiny_base, images, train={"max_steps": 6, "checkpoint_every": 2})
    reference = run_trainer(recipe, f"train.output_dir={tmp_path / 'ref'}")
    calls = {"n": 0}
    real = checkpoint.save_safetensors

    def failing(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: the disk fills up half-way
            Path(path).write_bytes(b"\0" * 10)
            raise OSError(28, "No space left on device")
        return real(tensors, path, metadata)

    monkeypatch.setattr(checkpoint, "save_safetensors", failing)
    with pytest.raises(RunError, match="previous checkpoint .*step-000002 is intact"):
        run_trainer(recipe)
    monkeypatch.setattr(checkpoint, "save_safetensors", real)
    assert checkpoint.find_resume(tmp_path / "out", "latest").name == "step-000002"
    t = run_trainer(recipe, "train.resume=latest")
    assert t.state.step == 6
    assert same_weights(tmp_path / "out" / EXPORT, Path(reference.cfg.output_dir) / EXPORT)


def test_resume_refuses_a_changed_recipe_or_dataset(tmp_path, tiny_base, images):
    from finetune.errors import UserError

    recipe = write_recipe(tmp_path, tiny_base, images, train={"max_steps": 3, "checkpoint_every": 2})
    run_trainer(recipe)
    with pytest.raises(UserError, match="the recipe .* changed"):
        run_trainer(recipe, "train.resume=latest", "train.lr=0.5", "train.max_steps=4")
    (images / "0.txt").write_text("a different caption")
    with pytest.raises(UserError, match="the dataset .* changed"):
        run_trainer(recipe, "train.resume=latest", "train.max_steps=4")
    t = run_trainer(recipe, "train.resume=latest", "train.max_steps=4", "train.resume_force=true")
    assert t.state.step == 4
