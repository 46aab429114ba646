"""Computed control images (data.control): canny edges (OpenCV) and the toy world's masks, made from each target
at the scan and then cut, flipped and cached with it like a control/ folder's images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import write_recipe


def targets(root: Path, n: int = 4) -> Path:
    """Plain captioned images (no control/ folder): a bright rectangle on dark, a different place each."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = np.full((64, 64, 3), 20, np.uint8)  # the training size: cut as is, so its edges are canny's own
        arr[8 + 4 * i: 40 + 4 * i, 10 + 3 * i: 50 + 3 * i] = 230
        Image.fromarray(arr).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text("a box")
    return root


def data_section(compute: str, **extra) -> dict:
    return {"conditioning": {"count": 1, "role": "spatial"}, "control": {"compute": compute, **extra}}


METHOD = {"name": "control_lora", "rank": 4, "targets": "attention"}


def test_canny_controls_are_the_targets_edges(tmp_path):
    import cv2

    from finetune.data.scan import scan_data
    from finetune.recipe import load_recipe

    path = write_recipe(tmp_path, "toy-flux", targets(tmp_path / "img"), data=data_section("canny", low=50, high=150),
                        method=METHOD)
    scan = scan_data(load_recipe(path, []).data, verbose=False)
    rec = scan.subsets[0].records[0]
    control = np.asarray(Image.open(io.BytesIO(rec.conditions[0].read())))
    target = np.asarray(Image.open(rec.path).convert("L"))
    assert control.shape == (*target.shape, 3) and control.max() == 255
    assert np.array_equal(control[..., 0], cv2.Canny(target, 50, 150))


def test_toy_masks_are_the_scorers_foreground(tmp_path):
    from finetune.data.scan import scan_data
    from finetune.recipe import load_recipe
    from finetune.toy.score import foreground

    src = {"type": "toy", "count": 3, "seed": 2}
    path = write_recipe(tmp_path, "toy-flux", tmp_path, data={**data_section("toy_mask"), "sources": [src]},
                        method=METHOD)
    rec = scan_data(load_recipe(path, []).data, verbose=False).subsets[0].records[1]
    mask = np.asarray(Image.open(io.BytesIO(rec.conditions[0].read())))[..., 0] > 127
    want = foreground(Image.open(io.BytesIO(rec.read())).convert("RGB")) > 0.1
    assert 0 < mask.sum() < mask.size and np.array_equal(mask, want)


@pytest.mark.parametrize("cached", [False, True])
def test_a_flipped_target_takes_its_flipped_control_and_the_cache_holds_it(tmp_path, cached):
    """The batch's control is the computed control of the target as cut and flipped (cached: its latents)."""
    from finetune.data.control import canny
    from finetune.recipe import load_recipe
    from finetune.train.setup import make_accelerator
    from finetune.train.trainer import Trainer

    data = {**data_section("canny"), "random_flip": True, "cache_latents": cached}
    path = write_recipe(tmp_path, "toy-flux", targets(tmp_path / "img"), data=data, train={"max_steps": 1},
                        method=METHOD)
    r = load_recipe(path, [])
    t = Trainer(r, make_accelerator(r))
    flips = []
    for batch in t.data.loader(0):
        for i, key in enumerate(batch["paths"]):
            img = Image.open(key).convert("RGB")
            edges = canny(img)
            want = torch.from_numpy(np.asarray(edges, np.float32)).permute(2, 0, 1) / 127.5 - 1
            px, flipped = want[None], torch.flip(want[None], dims=[-1])
            if cached:  # the cache holds the latents of the control as cut (and of its mirror image)
                px, flipped = t.encode_latents(px), t.encode_latents(flipped)
            got = batch["references"][0][i : i + 1] if cached else batch["reference_pixels"][0][i : i + 1]
            same, mirrored = (got - px).abs().max(), (got - flipped).abs().max()
            assert min(same, mirrored) < 1e-4, (same, mirrored)
            flips.append(bool(mirrored < same))
    assert any(flips) and not all(flips)


def test_control_needs_one_spatial_conditioning_image(tmp_path):
    from finetune.recipe import load_recipe

    path = write_recipe(tmp_path, "toy-flux", targets(tmp_path / "img"),
                        data={"control": {"compute": "canny"}}, method=METHOD)
    with pytest.raises(Exception, match="data.conditioning"):
        load_recipe(path, [])


def test_validation_renders_control_pairs_through_the_stock_control_pipeline_and_scores_them(tmp_path):
    """A control | outputs grid from FluxControlPipeline at the end, and each row's fidelity (edge F1) saved."""
    import json

    from tests.helpers import run_trainer

    img = targets(tmp_path / "img")
    path = write_recipe(tmp_path, "toy-flux", img, method=METHOD, data=data_section("canny"),
                        model={"max_sequence_length": 32, "guidance": None},
                        train={"max_steps": 2, "batch_size": 2},
                        validation={"prompts": ["a box", "a box"], "images": [str(img / "0.png"), str(img / "3.png")],
                                    "seeds": [0, 1], "steps": 2, "every": 1})
    t = run_trainer(path)
    assert type(t.comps.pipeline(edit=True)).__name__ == "FluxControlPipeline"
    scores = json.loads((Path(t.cfg.output_dir) / "samples" / "control_scores.json").read_text())
    assert set(scores) >= {"1"} and 0.0 <= scores["1"]["mean"] <= 1.0 and set(scores["1"]) == {"a box", "mean"}
    grid = Image.open(sorted((Path(t.cfg.output_dir) / "samples").glob("step-*.png"))[-1])
    assert grid.width >= 3 * 64  # the control, then one output per seed
    # the rows' controls are computed from the given pictures as training computes them from its targets
    from finetune.data.control import canny

    assert np.array_equal(np.asarray(t.pair_inputs[1][0]), np.asarray(canny(Image.open(img / "3.png").convert("RGB"))))
