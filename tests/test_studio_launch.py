"""Runs cannot import from the data root: the launch's working folder is the studio's, Python runs in safe-path
mode, and the recipe a run launches is the one the studio wrote and hashed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.studio_helpers import W, client, fake_launch, wait_until, world  # noqa: F401  (fixtures)

MODULES = ("yaml", "torch", "sitecustomize")  # what a launch imports first (and what Python imports at start)


def plant(root: Path, markers: Path) -> None:
    """Python files in the root that leave a marker file when imported."""
    for name in MODULES:
        (root / f"{name}.py").write_text(f"open({str(markers / name)!r}, 'w').write('imported')\n")


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
    wait_until(lambda: studio.runs.get(run_id).status not in ("queued", "running", "stopping"), 600)
    log = (root / ".studio" / "runs" / run_id / "log.txt").read_text()
    assert sorted(p.name for p in markers.iterdir()) == [], log
    assert studio.runs.get(run_id).status == "done", log
    assert (root / "runs" / "tiny" / "pytorch_lora_weights.safetensors").is_file()


def _imports(cmd: list[str], cwd: Path, env: dict, markers: Path) -> list[str]:
    """The planted modules a Python command imports (their markers), the markers then cleared."""
    import subprocess

    subprocess.run(cmd + ["-c", "import yaml"], cwd=cwd, env=env, check=True, capture_output=True, timeout=120)
    found = sorted(p.name for p in markers.iterdir())
    for p in markers.iterdir():
        p.unlink()
    return found


def test_python_from_the_studio_never_imports_the_root(world, tmp_path):  # noqa: F811
    import os
    import sys

    from finetune.studio import procs

    root, _ = world
    markers = tmp_path / "markers"
    markers.mkdir()
    plant(root, markers)
    plain = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    assert _imports([sys.executable], root, plain, markers) == ["yaml"]  # the launch before: the test can fail
    work = procs.work_dir(root / ".studio" / "runs" / "x")
    assert _imports([sys.executable], work, plain, markers) == []  # the studio's working folder alone
    if sys.version_info >= (3, 11):
        assert _imports(procs.python(), root, plain, markers) == []  # -P alone
        assert _imports([sys.executable], root, procs.safe_env(), markers) == []  # the environment alone (workers)
    assert procs.launch_command(Path("r.yaml"), [], None)[:4] == [*procs.python(), "-m", "accelerate.commands.launch"]


def test_a_run_starts_in_its_own_folder_in_safe_path_mode(world, fake_launch):  # noqa: F811
    import json

    root, _ = world
    c, studio = client(root, hold=False)
    data = copy_of(TINY)
    run_id = c.post("/api/runs", json={"data": data}, headers=W).json()["id"]
    wait_until(fake_launch.is_file, 60)
    probe = json.loads(fake_launch.read_text())
    assert probe["cwd"] == str(root / ".studio" / "runs" / run_id / "work")
    assert probe["safe_path"] in (True, None)  # None: Python 3.10, which has no safe-path mode
    c.post(f"/api/runs/{run_id}/stop", headers=W)
    wait_until(lambda: studio.runs.get(run_id).status not in ("running", "stopping"), 60)
    assert (root / "runs" / "tiny" / "checkpoints").is_dir()  # the absolute output_dir reached the trainer


def test_a_run_launches_only_the_recipe_the_studio_wrote(world, fake_launch):  # noqa: F811
    root, _ = world
    c, studio = client(root)
    ids = [c.post("/api/runs", json={"data": copy_of(TINY, f"runs/{n}")}, headers=W).json()["id"] for n in "abc"]
    folder = root / ".studio" / "runs"
    with (folder / ids[0] / "recipe.yaml").open("a") as f:
        f.write("# one byte more than the studio wrote\n")
    studio.runs.get(ids[1]).recipe_sha256 = ""  # a run from a studio that kept no hash
    studio.runs.hold = False
    studio.runs._schedule()
    wait_until(lambda: studio.runs.get(ids[2]).status == "running", 60)  # the third one is launched...
    for run_id in ids[:2]:  # ...the first two are not
        run = studio.runs.get(run_id)
        assert run.status == "failed" and run.launches == 0
        assert "not the one the studio wrote" in (folder / run_id / "log.txt").read_text()
    c.post(f"/api/runs/{ids[2]}/stop", headers=W)
    wait_until(lambda: studio.runs.get(ids[2]).status not in ("running", "stopping"), 60)


def copy_of(recipe: dict, output_dir: str = "runs/tiny") -> dict:
    import copy

    out = copy.deepcopy(recipe)
    out["train"]["output_dir"] = output_dir
    return out
