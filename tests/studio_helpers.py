"""Shared set-up of the studio tests: a root with data, a sealed folder beside it, an in-process client, and a
launcher and trainer played by small scripts (the real ones run in the browser test and the marker test)."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from finetune.studio import procs

W = {"X-Studio": "1"}  # what the page sends with every write


def png(path: Path, colour=(200, 30, 30), size: int = 64) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path


def snapshot(folder: Path) -> dict[str, tuple[int, float]]:
    """Every entry under a folder with its size and mtime: 'nothing outside the root changed' is equality."""
    out = {}
    for dirpath, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture()
def world(tmp_path):
    """root/ with data/ (3 captioned images and links out of the root), outside/ with a secret beside it."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    for i, c in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        png(root / "data" / f"{i}.png", c)
        (root / "data" / f"{i}.txt").write_text(f"caption {i}\n")
    png(outside / "secret.png", (1, 2, 3))
    (outside / "secret.txt").write_text("secret caption\n")
    (root / "data" / "link.png").symlink_to(outside / "secret.png")
    (root / "data" / "link.txt").symlink_to(outside / "secret.txt")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    return root, outside


def wait_until(check, timeout: float = 60.0, every: float = 0.05) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(every)
    raise AssertionError("timed out")


def client(root: Path, **kw):
    from starlette.testclient import TestClient

    from finetune.studio.app import Studio, create_app

    studio = Studio.make(root, **({"hold": True} | kw))
    return TestClient(create_app(studio), base_url="http://127.0.0.1:8765"), studio


TRAINER = textwrap.dedent('''
    import json, os, signal, sys, time
    from pathlib import Path
    import yaml
    args = sys.argv[1:]
    out = Path(yaml.safe_load(Path(args[0]).read_text())["train"]["output_dir"])  # relative to the cwd, or absolute
    (out / "logs").mkdir(parents=True, exist_ok=True)
    Path(os.environ["PROBE"]).write_text(json.dumps({"args": args, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
                                                    "cwd": os.getcwd(), "safe_path": getattr(sys.flags, "safe_path", None)}))
    step = [0]
    def stop(signum, frame):
        time.sleep(0.5)  # a checkpoint takes a while: the launcher must still be waiting for us
        ck = out / "checkpoints" / f"step-{step[0]:06d}"
        ck.mkdir(parents=True)
        (ck / "COMPLETE").write_text("")
        print(f"stopped by SIGTERM at step {step[0]}/100", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    if "train.resume=latest" in args:
        print("done: 5 steps in 1s; outputs in runs/fake", flush=True)
        sys.exit(0)
    with open(out / "logs" / "loss.csv", "w") as f:
        f.write("step,loss,lr\\n")
    while True:
        step[0] += 1
        with open(out / "logs" / "loss.csv", "a") as f:
            f.write(f"{step[0]},{1 / step[0]:.4f},0.001\\n")
        time.sleep(0.05)
''')
# the launcher, like accelerate's: runs the trainer as a child, waits, reports, exits with its code
LAUNCHER = textwrap.dedent('''
    import subprocess, sys
    code = subprocess.call([sys.executable, sys.argv[1], *sys.argv[2:]])
    print(f"launcher: trainer exited with {code}", flush=True)
    sys.exit(code)
''')


@pytest.fixture()
def fake_launch(tmp_path, monkeypatch):
    (tmp_path / "trainer.py").write_text(TRAINER)
    (tmp_path / "launcher.py").write_text(LAUNCHER)
    probes = tmp_path / "probes"
    probes.mkdir()
    monkeypatch.setenv("PROBE", str(probes / "last.json"))
    monkeypatch.setattr(procs, "launch_command", lambda recipe, overrides, config: [
        sys.executable, str(tmp_path / "launcher.py"), str(tmp_path / "trainer.py"), str(recipe), *overrides])
    return probes / "last.json"


# stands in for tools/caption.py (issue #26) with its command line, FOLDER and --prefix (argparse): writes a
# caption for each image that has none
CAPTIONER = textwrap.dedent('''
    import argparse
    from pathlib import Path
    p = argparse.ArgumentParser()
    p.add_argument("folder", type=Path)
    p.add_argument("--prefix", default="")
    args = p.parse_args()
    for img in sorted(args.folder.glob("*.png")):
        if not img.with_suffix(".txt").exists():
            img.with_suffix(".txt").write_text(args.prefix + "a captioned image")
''')
