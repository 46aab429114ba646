"""A newcomer's first hour on their own pictures (issue 34): each dead end found, as the commands a person types.

Two toy runs are shared by several tests: `own_run` trains on a folder of own pictures holding a corrupt file
(`data.on_bad_image: skip`), `toy_run` is the shipped toy recipe, cut to one step. The scripted hour itself is
tests/test_first_hour.py (slow)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, TOY_SMALL, cli

TOY = "recipes/toy/lora.yaml"


def folder_item(path: Path) -> str:
    return f"data.sources.0={{type: folder, path: {path}}}"


@pytest.fixture(scope="module")
def own_run(tmp_path_factory, pictures):
    out = tmp_path_factory.mktemp("own_run") / "run"
    done = cli("-m", "finetune", TOY, folder_item(pictures), "data.masks=null", "data.on_bad_image=skip",
               f"train.output_dir={out}", "train.max_steps=1", *TOY_SMALL)
    return done, out


# ------------------------------------------------------------------ 1. --check loads what the run will load
def test_a_run_that_skips_a_bad_file_scores_its_grids(own_run):
    done, out = own_run
    assert done.returncode == 0, done.stderr[-2000:]
    saved = json.loads((out / "samples" / "metrics.json").read_text())
    assert set(saved["steps"]) == {"0", "1"} and saved["references"] == 11  # 13 pictures, corrupt and tiny out


def test_check_reads_the_metric_references_with_the_runs_rules(tmp_path, pictures):
    refs = tmp_path / "refs"
    refs.mkdir()
    (refs / "good.png").write_bytes((pictures / "photo_01.png").read_bytes())
    (refs / "bad.jpg").write_bytes((pictures / "corrupt.jpg").read_bytes())
    base = [TOY, folder_item(pictures), "data.masks=null", f"validation.reference_dir={refs}", "--check"]
    stopped = cli("-m", "finetune", *base, "data.on_bad_image=error")
    assert stopped.returncode == 2 and stopped.stderr.count("\n") == 1, stopped.stderr
    assert "corrupt.jpg" in stopped.stderr  # the training folder's own bad file is named first
    skipping = cli("-m", "finetune", *base, "data.on_bad_image=skip")
    assert skipping.returncode == 0, skipping.stderr
    assert f"1 of 1 images from {refs}" in skipping.stdout and "bad.jpg" in skipping.stdout


def test_a_bad_reference_file_is_one_line_or_skipped(tmp_path, pictures):
    from finetune.errors import DataError
    from finetune.eval.run import reference_images
    from finetune.recipe import load_recipe

    refs = tmp_path / "refs"
    refs.mkdir()
    for name in ("photo_01.png", "photo_02.webp", "corrupt.jpg"):
        (refs / name).write_bytes((pictures / name).read_bytes())
    recipe = [f"validation.reference_dir={refs}", folder_item(pictures), "data.masks=null"]
    with pytest.raises(DataError, match="corrupt.jpg.*on_bad_image: skip"):
        reference_images(load_recipe(ROOT / TOY, recipe))
    kept = reference_images(load_recipe(ROOT / TOY, [*recipe, "data.on_bad_image=skip"]))
    assert len(kept) == 2 and all(im.mode == "RGB" for im in kept)


# ------------------------------------------------------------------------- 2. the resume hint is this run's
def test_the_sigterm_hint_resumes_this_run_with_its_overrides(tmp_path):
    out = tmp_path / "my run"  # a space: the hint must quote it
    args = ["-m", "finetune", TOY, "data.sources.0.count=8", f"train.output_dir={out}", "train.max_steps=500",
            "validation.prompts=[]", "validation.metrics=[]", "validation.score_subject=null", *TOY_SMALL]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    loss = out / "logs" / "loss.csv"
    deadline = time.time() + 300
    while not (loss.is_file() and len(loss.read_text().splitlines()) > 2) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    hint = next(line for line in stdout.splitlines() if line.startswith("resume with: "))
    cmd = shlex.split(hint.removeprefix("resume with: "))
    assert cmd[:3] == ["python", "-m", "finetune"]
    stopped = int(stdout.split("at step ")[1].split("/")[0])
    again = cli(*cmd[1:], f"train.max_steps={stopped + 2}", cwd=tmp_path)  # from anywhere, not the checkout
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed from {out}/checkpoints/step-{stopped:06d}" in again.stdout
    assert len((out / "logs" / "loss.csv").read_text().splitlines()) == stopped + 3  # header + every step once


# --------------------------------------------------------------- 3. "try it on my pictures": one documented way
def test_a_path_on_a_toy_source_says_how_to_use_a_folder(pictures):
    done = cli("-m", "finetune", TOY, f"data.sources.0.path={pictures}", "--check")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "'data.sources.0={type: folder, path: DIR}'" in done.stderr
    assert "recipes/toy/my_pictures.yaml data.sources.0.path=DIR" in done.stderr


def test_the_readmes_own_pictures_check_works(pictures):
    readme = (ROOT / "README.md").read_text()
    lines = [line.split("#")[0].strip() for line in readme.splitlines()
             if "my_pictures.yaml" in line and "--check" in line and line.lstrip().startswith("python -m finetune")]
    assert lines, "the README shows no --check of one's own pictures"
    done = cli(*shlex.split(lines[0].replace("path=my_pictures", f"path={pictures}"))[1:])
    assert done.returncode == 0, done.stderr
    assert "11 images x 1 repeats" in done.stdout and "2 file(s) skipped" in done.stdout


# ------------------------------------------------------------------------------- 4. captioning offline
def test_the_toy_captioner_captions_offline(tmp_path, pictures):
    folder = tmp_path / "pics"
    folder.mkdir()
    for p in pictures.glob("photo_0[13].*"):  # two uncaptioned red hearts
        (folder / p.name).write_bytes(p.read_bytes())
    done = cli("tools/caption.py", str(folder), "--model", "toy", "--trigger", "sks", "--class-word", "heart")
    assert done.returncode == 0, done.stderr
    captions = sorted(p.read_text().strip() for p in folder.glob("*.txt"))
    assert len(captions) == 2 and all(c.startswith("a red sks heart on a ") for c in captions), captions


def test_the_toy_captioner_reads_the_toy_world():
    from finetune.caption.models import load_captioner
    from finetune.toy.world import world_records

    records = world_records(120, seed=3)
    answers = load_captioner("toy").caption([im for im, _ in records], "short")
    right = sum(a.split()[1:3] == caps[0].split()[1:3] for a, (_, caps) in zip(answers, records, strict=True))
    assert right / len(records) > 0.5  # 25 colour x shape pairs: chance is 4%


def test_an_unreachable_hub_is_one_quick_line_that_offers_the_toy(tmp_path, pictures):
    import socket

    with socket.socket() as s:  # a port nothing listens on: refused at once, nothing leaves the machine
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env |= {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "tools/caption.py", str(pictures), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "cannot be reached" in done.stderr and "--model toy" in done.stderr
    assert "HF_HUB_OFFLINE" not in done.stderr and "Retrying" not in done.stderr


# ----------------------------------------------------------------------------------- 5. no silent minutes
def test_the_grids_and_metric_models_say_what_runs(toy_run):
    done, _ = toy_run
    assert "grid at step 0: sampling prompt 1/2 x 1 images" in done.stderr
    assert "grid at step 1: sampling prompt 2/2 x 1 images" in done.stderr
    assert "metrics: loading the metric models" in done.stderr


def test_evaluate_says_what_it_is_doing(tmp_path, toy_run, pictures):
    _, run = toy_run
    refs = tmp_path / "refs"
    refs.mkdir()
    (refs / "a.png").write_bytes((pictures / "photo_01.png").read_bytes())
    done = cli("tools/evaluate.py", "--base", "toy", "--lora", str(run), "--references", str(refs),
               "--prompts", "a sks heart", "--token", "sks", "--class-word", "heart", "--seeds", "0", "--steps", "2",
               "--clip-model", "toy", "--dino-model", "toy", "--out", str(tmp_path / "eval"))
    assert done.returncode == 0, done.stderr
    assert f"[1/1] lora {run}: loading, then sampling" in done.stdout and "scoring 1 images" in done.stdout
    assert "sampling prompt 1/1 x 1 images" in done.stderr  # the pipeline's own bar over its steps


# ------------------------------------------------------------------------------------ 6. studio Estimate
def test_the_studio_estimates_with_the_real_command(tmp_path):
    from tests.studio_helpers import W, client

    root = tmp_path / "root"
    root.mkdir()
    c, studio = client(root)
    assert c.get("/api/info").json()["features"]["estimate"] is True
    data = c.get("/api/recipes/toy/lora.yaml").json()
    r = c.post("/api/recipe/estimate", json={"data": data}, headers=W)
    assert r.status_code == 200, r.text
    assert r.json()["estimate"].startswith("memory estimate for toy (lora, 64 px, batch 8")
