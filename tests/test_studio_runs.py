"""The studio's run queue, its stop/resume semantics, the run page's data, and the recipe form.

The trainer is played by a small script (tests/studio_helpers.py; the real one runs in the browser test): it
logs loss rows, and on SIGTERM writes a checkpoint and says 'stopped by SIGTERM', as finetune/train does.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from tests.helpers import ROOT
from tests.studio_helpers import CAPTIONER, W, client, fake_launch, png, wait_until, world  # noqa: F401  (fixtures)


def _recipe(c, output_dir: str = "runs/fake") -> dict:
    data = c.get("/api/recipes/toy/lora.yaml").json()
    data["train"]["output_dir"] = output_dir
    return data


def test_two_tabs_cannot_start_the_same_run_twice(world):  # noqa: F811
    root, _ = world
    c, studio = client(root)
    data = _recipe(c)
    codes = []
    threads = [threading.Thread(target=lambda: codes.append(
        c.post("/api/runs", json={"data": data}, headers=W).status_code)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [200, 409, 409, 409]
    (run,) = studio.runs.list()
    assert run.status == "queued" and run.output_dir == "runs/fake"
    assert c.post(f"/api/runs/{run.id}/resume", json={}, headers=W).status_code == 409  # already queued
    assert c.post(f"/api/runs/{run.id}/stop", headers=W).json()["status"] == "cancelled"
    assert c.post(f"/api/runs/{run.id}/stop", headers=W).status_code == 409
    r = c.post("/api/runs", json={"data": data}, headers=W)  # its folder still belongs to that run
    assert r.status_code == 409 and run.id in r.json()["error"]
    launched = yaml.safe_load((root / ".studio" / "runs" / run.id / "recipe.yaml").read_text())
    assert launched["train"]["output_dir"] == str(root / "runs" / "fake")  # absolute: runs start elsewhere
    assert c.get(f"/api/runs/{run.id}/recipe").json() == data  # the form gets it back as it was sent


def test_stop_signals_the_trainer_not_the_launcher_then_resume_continues(world, fake_launch):  # noqa: F811
    root, _ = world
    c, studio = client(root, hold=False)
    run_id = c.post("/api/runs", json={"data": _recipe(c)}, headers=W).json()["id"]
    loss = root / "runs" / "fake" / "logs" / "loss.csv"
    wait_until(lambda: loss.is_file() and len(loss.read_text().split()) > 3)
    snap = c.get(f"/api/runs/{run_id}").json()
    assert snap["run"]["status"] == "running" and snap["loss"][0][:2] == [1, 1.0]
    assert c.post(f"/api/runs/{run_id}/stop", headers=W).json()["status"] == "stopping"
    wait_until(lambda: studio.runs.get(run_id).status not in ("running", "stopping"))
    run = studio.runs.get(run_id)
    log = (root / ".studio" / "runs" / run_id / "log.txt").read_text()
    assert run.status == "stopped" and run.exit_code == 0, log
    assert "launcher: trainer exited with 0" in log  # the launcher outlived the stop: it was not signalled
    assert c.get(f"/api/runs/{run_id}").json()["checkpoints"]
    r = c.post(f"/api/runs/{run_id}/resume", json={"max_steps": 5}, headers=W)
    assert r.status_code == 200, r.text
    wait_until(lambda: studio.runs.get(run_id).status == "done")
    assert c.get(f"/api/runs/{run_id}").json()["max_steps"] == 5  # the resumed budget, not the recipe's
    assert json.loads(fake_launch.read_text())["args"][1:] == ["train.resume=latest", "train.max_steps=5"]
    assert studio.runs.get(run_id).launches == 2


def test_one_run_at_a_time_per_device(world, fake_launch):  # noqa: F811
    root, _ = world
    c, studio = client(root, hold=False)
    first = c.post("/api/runs", json={"data": _recipe(c, "runs/fake")}, headers=W).json()["id"]
    second = c.post("/api/runs", json={"data": _recipe(c, "runs/other")}, headers=W).json()["id"]
    wait_until(lambda: fake_launch.is_file())
    time.sleep(0.5)
    assert studio.runs.get(second).status == "queued"  # one device: it waits
    c.post(f"/api/runs/{first}/stop", headers=W)
    wait_until(lambda: studio.runs.get(second).status != "queued")
    c.post(f"/api/runs/{second}/stop", headers=W)
    wait_until(lambda: studio.runs.get(second).status not in ("running", "stopping"))

    c2, studio2 = client(root / "data", hold=False, devices=["0", "1"])
    ids = [c2.post("/api/runs", json={"data": _recipe(c2, f"runs/{n}")}, headers=W).json()["id"] for n in "ab"]
    wait_until(lambda: all(studio2.runs.get(i).status == "running" for i in ids))  # two devices: both run
    assert sorted(studio2.runs.get(i).device for i in ids) == ["0", "1"]
    for i in ids:
        c2.post(f"/api/runs/{i}/stop", headers=W)
    wait_until(lambda: all(studio2.runs.get(i).status not in ("running", "stopping") for i in ids))


def test_run_page_data_from_the_run_folder(world):  # noqa: F811
    root, outside = world
    c, studio = client(root)
    run_id = c.post("/api/runs", json={"data": _recipe(c)}, headers=W).json()["id"]
    out = root / "runs" / "fake"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "loss.csv").write_text("step,loss,lr\n1,0.5,0.001\n2,0.25,0.002\n3,0.1")  # row 3 being written
    for step in (10, 0, 5):
        png(out / "samples" / f"step-{step:06d}.png")
    (out / "samples" / "scores.json").write_text(json.dumps({"0": {"a sks heart": 0.01}, "10": {"a sks heart": 0.3}}))
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    (out / "README.md").write_text("# card")
    (out / "samples" / "leak.png").symlink_to(outside / "secret.png")
    log = root / ".studio" / "runs" / run_id / "log.txt"
    log.write_text("loading\ntrain:   1%|          | 3/400 [00:01<02:10,  3.05step/s, loss=0.1]\r"
                   "train:   1%|          | 4/400 [00:01<01:59,  3.31step/s, loss=0.1]\rcheckpoint: x\n")
    snap = c.get(f"/api/runs/{run_id}").json()
    assert snap["loss"] == [[1, 0.5, 0.001], [2, 0.25, 0.002]]
    assert [g["step"] for g in snap["grids"]] == [0, 5, 10]
    assert snap["scores"]["10"]["a sks heart"] == 0.3
    assert [e["file"] for e in snap["exports"]] == ["README.md", "pytorch_lora_weights.safetensors"]
    assert snap["progress"] == {"step": 4, "total": 400, "elapsed": "00:01", "eta": "01:59", "steps_per_s": 3.31}
    assert snap["log"] == ["loading", "checkpoint: x"]
    assert snap["validation"]["prompts"] == ["a sks heart", "a blue square"]
    r = c.get(f"/api/runs/{run_id}/files/pytorch_lora_weights.safetensors", params={"download": "1"})
    assert r.content == b"weights" and r.headers["content-disposition"].startswith("attachment")
    for bad in ("samples/leak.png", "..%2F..%2Fdata%2F0.png", "%2Fetc%2Fpasswd"):
        assert c.get(f"/api/runs/{run_id}/files/{bad}").status_code in (403, 404), bad
    assert c.get("/api/runs/nope").status_code == 404


def test_form_covers_every_key_of_every_shipped_recipe():
    from finetune.recipe import load_recipe
    from finetune.studio.recipes import shipped_recipes
    from finetune.studio.schema import form_spec, spec_paths

    paths = spec_paths(form_spec())

    def keys(node, prefix=""):
        if isinstance(node, dict):
            for k, v in node.items():
                yield prefix + k
                yield from keys(v, prefix + k + ".")
        elif isinstance(node, list) and node and isinstance(node[0], dict):
            for item in node:
                yield from keys(item, prefix + "*.")

    names = shipped_recipes(ROOT / "recipes")
    assert "toy/lora.yaml" in names and not [n for n in names if n.startswith("accelerate/")]
    for name in names:
        resolved = load_recipe(ROOT / "recipes" / name).resolved()
        missing = [k for k in keys(resolved) if k not in paths and not k.startswith("method.")]
        method = {k.replace("method.", f"method.{resolved['method']['name']}.", 1) for k in keys(resolved)
                  if k.startswith("method.")}
        assert not missing, (name, missing)
        assert method, name


def test_form_errors_are_the_cli_messages(world, tmp_path):  # noqa: F811
    root, _ = world
    c, _ = client(root)
    data = _recipe(c)
    data["train"]["lr"] = -5
    data["method"]["rnk"] = 4
    errors = c.post("/api/recipe/validate", json={"data": data}, headers=W).json()["errors"]
    assert sorted(e["key"] for e in errors) == ["method.rnk", "train.lr"]
    folder = tmp_path / "cli"
    folder.mkdir()
    (folder / "recipe.yaml").write_text(yaml.safe_dump(data))
    cli = subprocess.run([sys.executable, "-m", "finetune", "recipe.yaml", "--print"], cwd=folder,
                         capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert cli.returncode == 2
    assert cli.stderr.strip().removeprefix("error: ").splitlines() == [e["message"] for e in errors]


def test_auto_caption_button_runs_the_captioning_tool_when_there_is_one(world, tmp_path):  # noqa: F811
    root, _ = world
    tools = tmp_path / "tools"
    tools.mkdir()
    c, _ = client(root, tools_dir=tools)
    assert c.get("/api/info").json()["features"]["caption"] is False
    assert c.post("/api/data/caption-all", json={"path": "data"}, headers=W).status_code == 400
    (tools / "caption.py").write_text(CAPTIONER)
    c, _ = client(root, tools_dir=tools)
    assert c.get("/api/info").json()["features"]["caption"] is True
    for link in ("link.png", "link.txt"):  # links out of the root: the folder would be refused (test_studio_holes)
        (root / "data" / link).unlink()
    png(root / "data" / "new.png")
    job = c.post("/api/data/caption-all", json={"path": "data", "prefix": "sks, "}, headers=W).json()
    wait_until(lambda: not c.get(f"/api/jobs/{job['id']}").json()["running"])
    assert (root / "data" / "new.txt").read_text() == "sks, a captioned image"
    assert (root / "data" / "0.txt").read_text() == "caption 0\n"


def test_the_page_is_plain_files_with_no_build_step():
    static = Path(__file__).resolve().parents[1] / "finetune" / "studio" / "static"
    html = (static / "index.html").read_text()
    assert 'src="/static/js/main.js"' in html
    for js in (static / "js").glob("*.js"):
        for line in js.read_text().splitlines():
            if line.startswith("import "):
                target = line.split('"')[1]
                assert (static / "js" / target).is_file(), (js.name, target)
