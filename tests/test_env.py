"""The environment: the version report, the known-bad combination check, readable files and a card snippet
that runs as written."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys

import pytest
import torch

from finetune import env
from tests.helpers import ROOT, write_recipe


def test_report_names_the_whole_stack_and_the_device():
    text = env.report()
    for name in ("python", "torch", "diffusers", "peft", "transformers", "accelerate", "datasets",
                 "bitsandbytes", "safetensors"):
        assert re.search(rf"^{name}: \S+", text, re.M), name
    assert re.search(r"^torch build: .*CUDA", text, re.M)
    assert re.search(r"^device: ", text, re.M)
    assert re.search(r"^host memory: \d", text, re.M)


def test_known_bad_pair_is_named_with_its_fix():
    bad = env.incompatibilities({"transformers": "5.24.0", "peft": "0.21.2"})
    assert len(bad) == 1
    assert "transformers 5.24.0 needs peft >= 0.22.0" in bad[0] and "pip install" in bad[0]
    assert env.incompatibilities({"transformers": "5.23.0", "peft": "0.21.2"}) == []
    assert env.incompatibilities({"transformers": "5.24.1", "peft": "0.22.0"}) == []
    assert env.incompatibilities({"transformers": "6.0.0.dev0", "peft": "0.21.0"}) != []


def test_training_refuses_a_known_bad_pair_in_one_line_before_loading(tmp_path, images, monkeypatch):
    versions = {"transformers": "5.24.0", "peft": "0.21.2"}
    monkeypatch.setattr(env, "installed", lambda name: versions.get(name, "1.0"))
    recipe = write_recipe(tmp_path, "does/not/exist", images)  # would fail later, loading the base
    from finetune.run import main

    with pytest.raises(SystemExit) as exc:
        main([str(recipe)])
    assert exc.value.code == 2
    assert not (tmp_path / "out").exists()


def test_env_command_exit_codes():
    out = subprocess.run([sys.executable, "-m", "finetune", "env", "--check"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([sys.executable, "-m", "finetune", "env"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0 and "diffusers:" in out.stdout


def test_atomic_writes_follow_the_umask(tmp_path):
    from finetune.export.io import save_safetensors, write_text_atomic

    old = os.umask(0o022)
    try:
        a = save_safetensors({"x": torch.zeros(2)}, tmp_path / "a.safetensors")
        b = write_text_atomic(tmp_path / "b.md", "hi")
    finally:
        os.umask(old)
    for p in (a, b):
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, oct(p.stat().st_mode)
    old = os.umask(0o077)
    try:
        c = write_text_atomic(tmp_path / "c.md", "private")
    finally:
        os.umask(old)
    assert stat.S_IMODE(c.stat().st_mode) == 0o600
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A short LoRA run on the toy base with a model card, written under umask 022."""
    from finetune.recipe import load_recipe
    from finetune.train.trainer import train
    from tests.helpers import draw_images

    tmp = tmp_path_factory.mktemp("toyrun")
    images = draw_images(tmp / "images")
    recipe = write_recipe(tmp, "toy", images, train={"max_steps": 2, "batch_size": 1},
                          export={"formats": ["diffusers", "kohya"], "model_card": True})
    old = os.umask(0o022)
    try:
        train(load_recipe(recipe))
    finally:
        os.umask(old)
    return tmp / "out"


def test_exports_and_card_are_world_readable(toy_run):
    files = [toy_run / "pytorch_lora_weights.safetensors", toy_run / "README.md", toy_run / "out.safetensors",
             toy_run / "recipe.yaml"]
    for p in files:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & stat.S_IRGRP and mode & stat.S_IROTH, f"{p.name}: {oct(mode)}"


def test_model_card_snippet_runs_as_written(toy_run):
    card = (toy_run / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "toy_base_path()" in code and "torch_dtype=torch.float32" in code
    code += "\nassert image.size[0] > 0\nprint('ran')\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=toy_run.parent,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ran" in out.stdout


def test_lock_pins_every_package_with_hashes():
    lock = (ROOT / "requirements" / "cpu.lock").read_text()
    pins = re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+) \\$", lock, re.M)
    names = {n.lower() for n, _ in pins}
    for core in ("torch", "diffusers", "peft", "transformers", "accelerate", "datasets", "bitsandbytes"):
        assert core in names, core
    assert ("torch", "2.13.0+cpu") in pins
    blocks = re.split(r"^(?=[A-Za-z0-9_.\-]+==)", lock, flags=re.M)[1:]
    assert all("--hash=sha256:" in b for b in blocks)
    assert env.lock_diff(ROOT / "requirements" / "cpu.lock") == [] or os.environ.get("FINETUNE_UNLOCKED")
