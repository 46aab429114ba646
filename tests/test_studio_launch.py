"""Runs cannot import from the data root: the launch's working folder is the studio's, Python runs in safe-path
mode, and the recipe a run launches is the one the studio wrote and hashed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.studio_helpers import W, client, world  # noqa: F401  (fixture)

MODULES = ("yaml", "torch", "sitecustomize")  # what a launch imports first (and what Python imports at start)


def plant(root: Path, markers: Path) -> None:
    """Python files in the root that leave a marker file when imported."""
    for name in MODULES:
        (root / f"{name}.py").write_text(f"open({str(markers / name)!r}, 'w').write('imported')\n")


def _wait(check, timeout: float):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError("timed out")


TINY = {  # the smallest real run: two toy images, one step, no validation grids
    "model": {"base": "toy"},
    "data": {"sources": [{"type": "toy", "count": 2}], "resolution": 64, "buckets": {"enabled": False}},
    "method": {"name": "lora", "rank": 2},
    "train": {"output_dir": "runs/tiny", "max_steps": 1, "batch_size": 1, "checkpoint_every": 0},
    "validation": {"prompts": [], "at_start": False},
    "logging": {"report_to": []},
}


@pytest.mark.slow
def test_a_real_run_imports_nothing_from_the_root(world, tmp_path):  # noqa: F811
    root, _ = world
    markers = tmp_path / "markers"
    markers.mkdir()
    plant(root, markers)
    c, studio = client(root, hold=False)
    r = c.post("/api/runs", json={"data": TINY}, headers=W)
    assert r.status_code == 200, r.text
    run_id = r.json()["id"]
    _wait(lambda: studio.runs.get(run_id).status not in ("queued", "running", "stopping"), 600)
    log = (root / ".studio" / "runs" / run_id / "log.txt").read_text()
    assert sorted(p.name for p in markers.iterdir()) == [], log
    assert studio.runs.get(run_id).status == "done", log
    assert (root / "runs" / "tiny" / "pytorch_lora_weights.safetensors").is_file()
