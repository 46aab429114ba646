"""The toy edit: exact pairs from the toy world, their scoring, the model card's snippet run as written, and (slow)
recipes/toy/flux_edit.yaml teaching several instructions on the FLUX toy base, scored on held-out inputs against
the untouched base."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from finetune.toy import edits
from tests.helpers import run_trainer

ROOT = Path(__file__).resolve().parents[1]
INSTRUCTIONS = ["make it red", "make it blue", "make it green", "make it a circle"]


def test_pairs_change_only_what_the_instruction_says():
    for p in edits.pairs(INSTRUCTIONS, 24, seed=3):
        a, b = np.asarray(p.input, np.int16), np.asarray(p.target, np.int16)
        changed = np.abs(a - b).max(-1) > 2  # Lanczos ringing of the shape reaches a level or two further
        from finetune.toy.score import object_mask

        around = (object_mask(p.input) > 0) | (object_mask(p.target) > 0)
        grown = np.zeros_like(around)  # the anti-aliased (Lanczos) rim of either object
        for dy in range(-3, 4):
            for dx in range(-3, 4):
                grown |= np.roll(np.roll(around, dy, 0), dx, 1)
        assert not (changed & ~grown).any(), p.instruction.text  # the background is untouched
        assert p.shape in edits.TRAIN_SHAPES and _hue_gap(p.input, "purple") >= edits.HELD_OUT_HUES - 1  # 8-bit rounding
        assert edits.score_one(p.target, p) == {"edit": True, "kept": True, "position": True, "all": True}
        assert not edits.score_one(p.input, p)["edit"]


def _hue_gap(img, colour: str) -> float:
    """Degrees between the object's mean hue and a palette colour's."""
    from finetune.toy.score import _PALETTE_HUES, _hue, _rgb, foreground

    rgb = _rgb(img)[foreground(img) > 0.9]
    return abs((float(_hue(rgb.mean(0))) - _PALETTE_HUES[colour] + 180) % 360 - 180)


def test_held_out_inputs_are_what_training_never_shows():
    train = edits.pairs(INSTRUCTIONS, 64, seed=0)
    held = edits.pairs(INSTRUCTIONS, 64, seed=0, held_out=True)
    assert min(_hue_gap(p.input, "purple") for p in train) >= edits.HELD_OUT_HUES - 1
    assert max(_hue_gap(p.input, "purple") for p in held) < 5
    assert "circle" in {p.shape for p in held} and "circle" not in {p.shape for p in train}
    scores = edits.score([p.target for p in held], held)
    assert set(scores) == set(INSTRUCTIONS) and all(s["all"] == 1.0 for s in scores.values())


def test_a_moved_object_loses_its_position():
    from finetune.toy import world

    p = edits.pairs(["make it blue"], 1, seed=1)[0]
    moved = world.draw(p.shape, "blue", p.background, 10, 10, 8)
    assert not edits.score_one(moved, p)["position"]


def test_unknown_instructions_are_refused_at_recipe_time(tmp_path):
    from finetune.errors import RecipeError
    from finetune.recipe import load_recipe

    with pytest.raises(RecipeError, match="'make it sparkle' is not a toy edit"):
        load_recipe(ROOT / "recipes" / "toy" / "flux_edit.yaml", ["data.sources.0.edits=[make it sparkle]"])


def _snippet(readme: Path) -> str:
    return re.search(r"```python\n(.*?)```", readme.read_text(), re.S)[1]


def test_the_model_cards_snippet_runs_as_written_and_edits(tmp_path):
    """A short run of the shipped recipe; its card's snippet (stock FluxKontextPipeline, the toy's settings) runs
    in a fresh interpreter beside the run folder and returns an image."""
    run = tmp_path / "toy-edit"
    run_trainer(ROOT / "recipes" / "toy" / "flux_edit.yaml", f"train.output_dir={run}", "train.max_steps=2",
                "data.sources.0.count=16", "validation.prompts=[make it blue]", "validation.images=[toy:purple star]",
                "validation.seeds=[0]", "validation.steps=2", "validation.at_start=false", "logging.progress=false",
                "export.formats=[diffusers]")
    code = _snippet(run / "README.md")
    for needed in ("FluxKontextPipeline", "_auto_resize=False", "max_area=4096", "max_sequence_length=32",
                   "true_cfg_scale=2.0", "negative_prompt=''"):
        assert needed in code, needed
    code = code.replace("num_inference_steps=28", "num_inference_steps=2")  # the same call, fewer steps
    code += "\nimage.save('edited.png')\n"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    from PIL import Image

    assert Image.open(tmp_path / "edited.png").size == (64, 64)
    # the scoring tool (docs/toy.md's numbers) over the same run: every instruction, base and LoRA, one grid
    from tests.test_tools_export import run_tool

    assert run_tool("score_toy_edit", run, "--n", 1, "--steps", 2, "--out", tmp_path / "scores") == 0
    scores = json.loads((tmp_path / "scores" / "results.json").read_text())
    assert set(scores["base"]) == set(scores["lora"]) == set(INSTRUCTIONS)
    assert Image.open(tmp_path / "scores" / "grid.png").size[0] == 64  # one column: n pairs per instruction


@pytest.mark.slow
def test_a_short_edit_run_learns_an_instruction_on_held_out_inputs(tmp_path):
    """A small version of the shipped recipe (one instruction, 256 pairs, 150 steps: a few minutes on two cores):
    the exported LoRA in the stock Kontext pipeline turns held-out purple objects green in place, where the untouched
    base on the same inputs and seeds does not. The full recipe's numbers (every instruction) are in docs/toy.md."""
    run, text = tmp_path / "run", "make it green"
    t = run_trainer(ROOT / "recipes" / "toy" / "flux_edit.yaml", f"train.output_dir={run}", "logging.progress=false",
                    f"data.sources.0.edits=[{text}]", "data.sources.0.count=256", "train.max_steps=150",
                    "train.batch_size=8", "validation.every=0", "validation.at_start=false", "export.formats=[diffusers]")
    ps = edits.pairs([text], 12, seed=1, held_out=True)
    guidance = t.recipe.validation.guidance_scale
    tuned = edits.score(edits.run(edits.edit_pipeline(lora=run), ps, guidance=guidance), ps)[text]
    base = edits.score(edits.run(edits.edit_pipeline(), ps, guidance=guidance), ps)[text]
    print(f"\nbase {base}\ntuned {tuned}")
    assert tuned["edit"] >= 0.75 and tuned["all"] >= 0.6, tuned  # measured 1.00 and 0.83 (10 of 12)
    assert tuned["all"] >= base["all"] + 0.5, (tuned, base)  # the base: 0.00 (green in none of 12)
