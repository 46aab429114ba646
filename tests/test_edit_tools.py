"""Tools and metrics that speak edits: tools/generate.py --image through the family's edit pipeline, edit metrics
(subject fidelity to each pair's own target, CLIP-T to the instruction), and a validation grid of pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_tools_export import run_tool


@pytest.fixture(scope="module")
def kontext(tmp_path_factory):
    from finetune.models.tiny import build_tiny

    return build_tiny("flux_kontext", tmp_path_factory.mktemp("kontext") / "base")


def test_generate_with_image_edits_the_input(tmp_path, kontext):
    outputs = []
    for colour in ("red", "blue"):
        Image.new("RGB", (64, 64), colour).save(tmp_path / f"{colour}.png")
        out = tmp_path / f"{colour}_grid.png"
        assert run_tool("generate", "make it green", "--base", kontext, "--image", tmp_path / f"{colour}.png",
                        "--steps", 2, "--seeds", 0, 1, "--width", 64, "--height", 64, "--guidance", 2.5,
                        "--max-sequence-length", 32, "--save-images", tmp_path / colour, "--out", out) == 0
        outputs.append(np.asarray(Image.open(tmp_path / colour / "p00-s0.png"), dtype=np.float32))
        grid = np.asarray(Image.open(out).convert("RGB"))
        cell = grid[-64:, :64].reshape(-1, 3).mean(0)  # the row starts with its input
        assert cell[0 if colour == "red" else 2] > 200, cell
        assert grid.shape[1] == 3 * 64  # input | seed 0 | seed 1
    # same seed, same prompt: only the input differs (0..255 scale; the tiny model is random)
    assert np.abs(outputs[0] - outputs[1]).max() >= 1.0


def test_generate_refuses_an_image_for_a_family_without_references(tmp_path, tiny_base, capsys):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "in.png")
    assert run_tool("generate", "x", "--base", tiny_base, "--image", tmp_path / "in.png", "--out",
                    tmp_path / "o.png") != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--image: the sd1 family takes no conditioning images" in err[0]
    assert run_tool("generate", "x", "--base", tiny_base, "--image", tmp_path / "gone.png", "--out",
                    tmp_path / "o.png") != 0
    assert "gone.png: no such image (--image)" in capsys.readouterr().err


def test_edit_metrics_compare_each_row_with_its_own_target():
    from finetune.eval.embedders import EvalModels
    from finetune.eval.scoring import Scorer
    from finetune.toy import world

    red, blue = world.draw("square", "red"), world.draw("circle", "blue")
    scorer = Scorer(["clip_i", "clip_t", "dino"], EvalModels("toy", "toy"), [], row_targets=[red, None, blue])
    rows = [[red, red], [blue], [red]]  # row 0 hits its target, row 1 has none, row 2 misses
    scores = scorer.score(rows, ["make it red", "make it blue", "make it a blue circle"])
    assert scores.rows[0]["clip_i"] == pytest.approx(1.0, abs=1e-5) and "clip_i" not in scores.rows[1]
    assert scores.rows[2]["dino"] < scores.rows[0]["dino"] - 0.05
    assert scores.overall["clip_i"].n == 3  # rows 0 and 2 only
    assert all("clip_t" in r for r in scores.rows)


def test_pair_images_take_the_training_geometry(tmp_path):
    from finetune.recipe import validate
    from finetune.train.edits import as_pixels, pair_images

    Image.new("RGB", (128, 64), "red").save(tmp_path / "wide.png")
    base = {"model": {"family": "flux2_klein"}, "method": {"name": "lora"},
            "train": {"output_dir": str(tmp_path / "o")},
            "data": {"sources": [{"type": "folder", "path": str(tmp_path)}], "resolution": 64}}
    spatial = validate({**base, "data": {**base["data"], "conditioning": {}},
                        "validation": {"prompts": ["a", "b"], "images": [str(tmp_path / "wide.png"), "toy:blue star"]}})
    rows = pair_images(spatial, (64, 64))
    assert [im.size for row in rows for im in row] == [(64, 64), (64, 64)]
    ref = validate({**base, "data": {**base["data"], "conditioning": {"role": "reference", "resolution": 128}},
                    "validation": {"prompts": ["a"], "images": [str(tmp_path / "wide.png")]}})
    (im,) = pair_images(ref, (64, 64))[0]
    assert im.size == (128, 128)
    (px,) = as_pixels([im])
    assert px.shape == (1, 3, 128, 128) and torch.allclose(px[0, :, 0, 0], torch.tensor([1.0, -1, -1]))
