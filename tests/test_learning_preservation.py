"""Learn the subject, leave the rest alone (slow: toy trainings of a minute or more each).

- the shipped demo (recipes/toy/lora.yaml, base-prediction preservation on) draws the held-out red heart and
  leaves "a blue square" as the base draws it, within the bounds of issue 22;
- at the same steps, preservation keeps the unrelated prompt closer to the base than no preservation;
- masking out the background makes the learned subject independent of the training background (not reached yet:
  an expected failure with its numbers).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import run_trainer

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "toy" / "lora.yaml"
TRIGGER, UNRELATED = "a sks heart", "a blue square"
# "a blue square"'s pixel drift from the base after the demo as it was before preservation (recipes/toy/lora.yaml
# at commit af8f3e9: world images trained toward the noise, 400 steps; "a sks heart" 0.261, "a blue square"
# colour 5/8 and shape 8/8 against the base's 7/8 and 8/8), measured with finetune.toy.score.drift_scores
BEFORE_DRIFT = 0.356


def _scores(out: Path) -> dict:
    scores = json.loads((out / "samples" / "scores.json").read_text())
    return scores["0"], scores[max(scores, key=int)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "run"
    run_trainer(DEMO, f"train.output_dir={out}", "logging.report_to=[]", "logging.progress=false")
    return out


def _gap(base: dict, end: dict, n: int = 8) -> int:
    """Seeds by which "a blue square"'s colour and shape accuracy moved away from the base's."""
    return sum(round(abs(end[f"{UNRELATED} | {m}"] - base[f"{UNRELATED} | {m}"]) * n) for m in ("colour", "shape"))


@pytest.mark.slow
def test_demo_learns_the_heart_and_leaves_blue_squares_blue(demo):
    base, end = _scores(demo)
    n = 8
    print(f"'{TRIGGER}' similarity {end[TRIGGER]:.3f}; '{UNRELATED}' colour {end[UNRELATED + ' | colour'] * n:.0f}/8 "
          f"(base {base[UNRELATED + ' | colour'] * n:.0f}/8), shape {end[UNRELATED + ' | shape'] * n:.0f}/8 "
          f"(base {base[UNRELATED + ' | shape'] * n:.0f}/8), drift {end[UNRELATED + ' | drift']:.3f} "
          f"(before preservation {BEFORE_DRIFT:.3f})")
    assert end[TRIGGER] >= 0.5
    for measure in ("colour", "shape"):
        key = f"{UNRELATED} | {measure}"
        assert end[key] >= base[key] - 1 / n - 1e-9, (measure, base[key], end[key])
    # issue 22 asks for half of BEFORE_DRIFT (0.178); the shipped recipe reaches 0.271 (docs/toy.md), so this
    # holds it below the value before preservation, not yet at the target
    assert end[UNRELATED + " | drift"] <= 0.30


@pytest.mark.slow
def test_preservation_keeps_unrelated_prompts_closer_to_the_base(demo, tmp_path):
    """The same recipe with the world images trained toward the noise instead of the base's prediction."""
    out = tmp_path / "plain"
    run_trainer(DEMO, f"train.output_dir={out}", "logging.report_to=[]", "logging.progress=false",
                "data.sources.1.preserve=false", "data.preservation=null")
    base, with_pres = _scores(demo)
    _, without = _scores(out)
    key = UNRELATED + " | drift"
    print(f"'{UNRELATED}' at the same steps: accuracy gap to the base {_gap(base, with_pres)} seeds with preservation, "
          f"{_gap(base, without)} without; drift {with_pres[key]:.3f} and {without[key]:.3f}")
    assert _gap(base, with_pres) < _gap(base, without)
    assert with_pres[key] <= without[key] + 0.02


def _black_background_hearts(folder: Path, n: int = 24) -> Path:
    """Red hearts drawn on black only, with masks that keep the heart (dilated by a pixel) and drop the rest."""
    from PIL import Image, ImageFilter

    from finetune.toy import world
    from finetune.toy.score import foreground

    (folder / "masks").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        cx, cy, r = rng.uniform(26, 38), rng.uniform(26, 38), rng.uniform(14, 22)
        img = world.draw("heart", "red", "black", cx, cy, r)
        img.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(TRIGGER)
        mask = Image.fromarray((foreground(img) > 0.2).astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(3))
        mask.save(folder / "masks" / f"{i}.png")
    return folder


def _background_brightness(images) -> float:
    from finetune.toy.score import foreground

    vals = [np.asarray(im.convert("L"), dtype=np.float32)[foreground(im) < 0.1].mean() for im in images]
    return float(np.mean(vals))


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="not reached yet (issue 22): with the background masked out (weight 0) the "
                   "LoRA still paints it black, brightness 27.5 masked vs 26.9 plain (base-like would be > 87); the "
                   "masked-out area is ignored, not held to the base, so the adapter is free to change it there")
def test_masked_loss_learns_the_subject_not_the_background(tmp_path):
    from finetune.toy.score import subject_similarity
    from finetune.train.validation import make_pipeline, render

    images = _black_background_hearts(tmp_path / "hearts")
    common = [f"data.sources=[{{type: folder, path: {images}}}]", "data.preservation=null",
              "train.max_steps=200", "validation.every=0", "logging.report_to=[]", "logging.progress=false"]
    result = {}
    for name, extra in (("plain", []), ("masked", ["data.masks={unmasked_weight: 0.0}"])):
        t = run_trainer(DEMO, f"train.output_dir={tmp_path / name}", *common, *extra)
        v = t.recipe.validation
        rows = render(make_pipeline(t.comps, v), [TRIGGER], v.seeds, v, (64, 64), "cpu")[0]
        result[name] = (_background_brightness(rows), np.mean([subject_similarity(im, "red_heart") for im in rows]))
    print({k: f"background brightness {b:.1f}, heart similarity {s:.3f}" for k, (b, s) in result.items()})
    assert result["plain"][0] < 60  # without masks the black training background is learned
    assert result["masked"][0] > result["plain"][0] + 60  # with them the base's light backgrounds stay
    assert result["masked"][1] > 0.2  # and the heart itself is still learned
