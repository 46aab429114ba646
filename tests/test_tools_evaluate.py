"""tools/evaluate.py: two toy LoRAs and the base scored in one table, with the numbers written to results.json."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, write_recipe
from tests.test_train_lora import run_trainer

TOOL = ROOT / "tools" / "evaluate.py"
CELL = r"(-?\d\.\d{3}) \[(-?\d\.\d{3}), (-?\d\.\d{3})\]"


def run_tool(*args: str) -> subprocess.CompletedProcess:
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def toy_loras(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Two LoRAs on the toy base after 4 and 16 steps on the red heart, and a folder of red-heart references."""
    from finetune.toy import world

    root = tmp_path_factory.mktemp("evaluate")
    refs = root / "refs"
    refs.mkdir()
    for i, (img, _) in enumerate(world.subject_images("red_heart", 6, seed=50)):
        img.save(refs / f"{i}.png")
    runs = []
    for steps in (4, 16):
        folder = root / f"run{steps}"
        folder.mkdir()
        recipe = write_recipe(folder, "toy", refs, data={
            "sources": [{"type": "toy", "subject": "red_heart", "count": 16, "prompt": "a sks heart"}],
            "cache_latents": True}, method={"rank": 4, "alpha": 4, "targets": "locon"},
            train={"max_steps": steps, "batch_size": 8, "lr": 2e-3})
        runs.append(Path(run_trainer(recipe).cfg.output_dir))
    return runs[0], runs[1], refs


def test_two_toy_loras_in_one_table(toy_loras, tmp_path):
    short, longer, refs = toy_loras
    out = tmp_path / "eval"
    proc = run_tool("--base", "toy", "--with-base", "--lora", str(short), "--lora", str(longer),
                    "--references", str(refs), "--prompts", "a sks heart", "a sks heart on a black background",
                    "--token", "sks", "--class-word", "heart", "--seeds", "0", "1", "--steps", "8",
                    "--guidance", "5", "--clip-model", "toy", "--dino-model", "toy", "--device", "cpu",
                    "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("candidate"))
    assert re.split(r"\s{2,}", lines[head].strip()) == ["candidate", "DINO", "CLIP-I", "CLIP-T"]
    table = {}
    for line in lines[head + 2: head + 5]:
        label = line.split("  ")[0].strip()
        cells = [tuple(map(float, c)) for c in re.findall(CELL, line)]
        assert len(cells) == 3, line
        assert all(lo <= mean <= hi for mean, lo, hi in cells), line
        table[label] = [c[0] for c in cells]
    assert list(table) == ["base", f"lora {short}", f"lora {longer}"]
    # the printed numbers are results.json's, and the three candidates really differ
    saved = json.loads((out / "results.json").read_text())
    for label, means in table.items():
        js = saved["candidates"][label]["overall"]
        assert [round(js[m]["mean"], 3) for m in ("dino", "clip_i", "clip_t")] == pytest.approx(means, abs=1e-3)
        assert js["dino"]["n"] == 4  # 2 prompts x 2 seeds
    assert len({tuple(v) for v in table.values()}) == 3
    assert len(list(out.glob("*.png"))) == 3


def test_folder_of_images_and_bad_input(tmp_path, toy_loras):
    from finetune.toy import world

    _, _, refs = toy_loras
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, (img, cap) in enumerate(world.subject_images("red_heart", 3, seed=9) + world.world_images(3, seed=9)):
        img.save(imgs / f"{i}.png")
        (imgs / f"{i}.txt").write_text(cap)
    proc = run_tool("--images", str(imgs), "--references", str(refs), "--clip-model", "toy", "--dino-model", "toy",
                    "--out", str(tmp_path / "e"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = json.loads((tmp_path / "e" / "results.json").read_text())["candidates"][f"images {imgs}"]
    rows = {r["prompt"]: r for r in saved["rows"]}
    hearts = [r["dino"] for p, r in rows.items() if "heart" in p]
    others = [r["dino"] for p, r in rows.items() if "heart" not in p]
    assert min(hearts) > max(others)  # red hearts look like the red-heart references, world images do not
    bad = run_tool("--images", str(imgs), "--clip-model", "toy", "--dino-model", "toy")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--references" in bad.stderr
