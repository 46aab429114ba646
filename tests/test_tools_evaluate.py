"""tools/evaluate.py: two LoRAs and the base scored in one table (tiny base; toy base in the slow test), the
numbers also in results.json; a folder of images; bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, run_trainer, write_recipe

TOOL = ROOT / "tools" / "evaluate.py"
CELL = r"(-?\d\.\d{3}) \[(-?\d\.\d{3}), (-?\d\.\d{3})\]"


def run_tool(*args: str) -> subprocess.CompletedProcess:
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, env=env, timeout=600)


def red_hearts(folder: Path, n: int = 6, seed: int = 50) -> Path:
    from finetune.toy import world

    folder.mkdir(parents=True, exist_ok=True)
    for i, (img, _) in enumerate(world.subject_images("red_heart", n, seed=seed)):
        img.save(folder / f"{i}.png")
    return folder


def train_loras(root: Path, base, images: Path, steps: tuple[int, ...], **recipe) -> list[Path]:
    runs = []
    for n in steps:
        folder = root / f"run{n}"
        folder.mkdir(parents=True)
        path = write_recipe(folder, base, images, train={"max_steps": n, "batch_size": 4, "lr": 3e-3}, **recipe)
        runs.append(Path(run_trainer(path).cfg.output_dir))
    return runs


def parse_table(stdout: str) -> dict[str, list[tuple[float, float, float]]]:
    """{candidate: [(mean, low, high) for DINO, CLIP-I, CLIP-T]} from the printed table."""
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("candidate"))
    assert re.split(r"\s{2,}", lines[head].strip()) == ["candidate", "DINO", "CLIP-I", "CLIP-T"]
    table = {}
    for line in lines[head + 2:]:
        if not line.strip():
            break
        cells = [tuple(map(float, c)) for c in re.findall(CELL, line)]
        assert len(cells) == 3 and all(lo <= mean <= hi for mean, lo, hi in cells), line
        table[line.split("  ")[0].strip()] = cells
    return table


def evaluate(base, loras: list[Path], refs: Path, out: Path, prompts: list[str], token: str, word: str,
             steps: int) -> dict:
    args = ["--base", str(base), "--with-base", *[a for lora in loras for a in ("--lora", str(lora))],
            "--references", str(refs), "--prompts", *prompts, "--token", token, "--class-word", word,
            "--seeds", "0", "1", "--steps", str(steps), "--guidance", "5", "--clip-model", "toy",
            "--dino-model", "toy", "--device", "cpu", "--out", str(out)]
    proc = run_tool(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = parse_table(proc.stdout)
    assert list(table) == ["base", *[f"lora {lora}" for lora in loras]]
    # the printed numbers are results.json's
    saved = json.loads((out / "results.json").read_text())["candidates"]
    for label, cells in table.items():
        js = saved[label]["overall"]
        assert [js[m]["mean"] for m in ("dino", "clip_i", "clip_t")] == pytest.approx([c[0] for c in cells], abs=6e-4)
        assert js["clip_t"]["n"] == 2 * len(prompts)
    assert len(list(out.glob("*.png"))) == len(table)
    return table


def test_two_loras_in_one_table(tmp_path, tiny_base, images):
    loras = train_loras(tmp_path, tiny_base, images, (2, 6))
    table = evaluate(tiny_base, loras, images, tmp_path / "eval", ["a sks circle", "a sks circle on a black "
                     "background"], "sks", "circle", steps=2)
    assert len({tuple(cells) for cells in table.values()}) == 3  # the candidates really differ


@pytest.mark.slow
def test_two_toy_loras_in_one_table(tmp_path):
    refs = red_hearts(tmp_path / "refs")
    data = {"sources": [{"type": "toy", "subject": "red_heart", "count": 32, "prompt": "a sks heart"}],
            "cache_latents": True}
    loras = train_loras(tmp_path, "toy", refs, (20, 150), data=data,
                        method={"rank": 8, "alpha": 8, "targets": "locon"})
    table = evaluate("toy", loras, refs, tmp_path / "eval", ["a sks heart", "a sks heart on a black background"],
                     "sks", "heart", steps=20)
    dino = {label: cells[0][0] for label, cells in table.items()}
    print(f"DINO: {dino}")
    assert dino[f"lora {loras[1]}"] > dino["base"] + 0.1  # the longer-trained LoRA drew the subject


def test_folder_of_images_and_bad_input(tmp_path):
    from finetune.toy import world

    refs = red_hearts(tmp_path / "refs")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, (img, cap) in enumerate(world.subject_images("red_heart", 3, seed=9) + world.world_images(3, seed=9)):
        img.save(imgs / f"{i}.png")
        (imgs / f"{i}.txt").write_text(cap)
    proc = run_tool("--images", str(imgs), "--references", str(refs), "--clip-model", "toy", "--dino-model", "toy",
                    "--out", str(tmp_path / "e"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(parse_table(proc.stdout)) == [f"images {imgs}"]
    saved = json.loads((tmp_path / "e" / "results.json").read_text())["candidates"][f"images {imgs}"]
    rows = {r["prompt"]: r for r in saved["rows"]}
    hearts = [r["dino"] for p, r in rows.items() if "heart" in p]
    others = [r["dino"] for p, r in rows.items() if "heart" not in p]
    assert min(hearts) > max(others)  # red hearts look like the red-heart references, world images do not
    bad = run_tool("--images", str(imgs), "--clip-model", "toy", "--dino-model", "toy")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--references" in bad.stderr


def test_model_and_embedding_candidates(tmp_path, tiny_base, images):
    """A whole model scores exactly like the same weights as --with-base; an embedding's token reaches the prompts."""
    import torch

    from finetune.export.embeddings import write_embedding_file

    emb = write_embedding_file({"text_encoder": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))},
                               "<sks>", tmp_path / "sks.safetensors", "diffusers", {})
    out = tmp_path / "eval"
    proc = run_tool("--base", str(tiny_base), "--with-base", "--model", str(tiny_base), "--embedding", str(emb),
                    "--references", str(images), "--prompts", "a <sks> on a table", "--token", "<sks>",
                    "--class-word", "circle", "--seeds", "0", "1", "--steps", "2", "--clip-model", "toy",
                    "--dino-model", "toy", "--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = parse_table(proc.stdout)
    assert list(table) == ["base", f"embedding {emb}", f"model {tiny_base}"]
    assert table[f"model {tiny_base}"] == table["base"]
    assert table[f"embedding {emb}"] != table["base"]  # '<sks>' was a new token with its own vectors
