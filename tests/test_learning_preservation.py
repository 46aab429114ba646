"""Learn the subject, leave the rest alone (slow: toy trainings of a minute or more each).

- the shipped demo learns its held-out subject (the red heart), and an unrelated prompt still draws what the
  base draws;
- the shipped demo (recipes/toy/lora.yaml: base-prediction preservation, hearts masked with the area around them
  held to the base) draws the held-out red heart and leaves "a blue square" as the base draws it, within the
  bounds of issue 22;
- at the same steps, preservation keeps the unrelated prompt closer to the base than no preservation;
- masking out the background, with the masked-out area held to the base's prediction, makes the learned subject
  independent of the training background.
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


def _scores(out) -> dict:
    if not isinstance(out, Path):  # the demo's trainer
        out = Path(out.cfg.output_dir)
    scores = json.loads((out / "samples" / "scores.json").read_text())
    return scores["0"], scores[max(scores, key=int)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The shipped demo, trained once for this module's tests (its Trainer: components, recipe, run folder)."""
    out = tmp_path_factory.mktemp("demo") / "run"
    return run_trainer(DEMO, f"train.output_dir={out}", "logging.report_to=[]", "logging.progress=false")


@pytest.mark.slow
def test_the_demo_learns_the_held_out_subject(demo):
    from finetune.toy.score import colour_of, shape_of, subject_similarity
    from finetune.train.validation import make_pipeline, render

    scores = json.loads((Path(demo.cfg.output_dir) / "samples" / "scores.json").read_text())
    steps = sorted(scores, key=int)
    v = demo.recipe.validation
    subject, trigger = v.score_subject, v.prompts[0]
    before, after = scores[steps[0]][trigger], scores[steps[-1]][trigger]
    print(f"{subject} similarity for '{trigger}': base {before:.3f} -> LoRA {after:.3f}")
    assert steps[0] == "0" and int(steps[-1]) == demo.recipe.train.max_steps
    assert after > before + 0.2, (before, after)

    # an unrelated prompt still draws what the base draws (a blue square), and nothing like the subject
    lora_rows = render(make_pipeline(demo.comps, v), [UNRELATED], v.seeds, v, (64, 64), "cpu")[0]
    base_rows = render(make_pipeline(_base_components(), v), [UNRELATED], v.seeds, v, (64, 64), "cpu")[0]

    def right(rows):
        return sum(colour_of(im) == "blue" and shape_of(im) == "square" for im in rows)

    unrelated_sim = float(np.mean([subject_similarity(im, subject) for im in lora_rows]))
    print(f"'{UNRELATED}': base {right(base_rows)}/{len(base_rows)} blue squares, LoRA {right(lora_rows)}/"
          f"{len(lora_rows)}; {subject} similarity {unrelated_sim:.3f}")
    assert right(lora_rows) >= right(base_rows) - 2
    assert unrelated_sim < 0.05


def _base_components():
    from finetune.models.base import resolve_base
    from finetune.models.components import load_components

    return load_components(resolve_base("toy"))


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
    assert end[UNRELATED + " | drift"] <= BEFORE_DRIFT / 2  # issue 22: at most half of the drift before


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


def _masked_hearts(folder: Path, background: str, n: int = 24) -> Path:
    """Red hearts drawn on one background only, with masks that keep the heart (dilated by a pixel)."""
    from PIL import Image, ImageFilter

    from finetune.toy import world
    from finetune.toy.score import foreground

    (folder / "masks").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        cx, cy, r = rng.uniform(26, 38), rng.uniform(26, 38), rng.uniform(14, 22)
        img = world.draw("heart", "red", background, cx, cy, r)
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
def test_masked_loss_learns_the_subject_not_the_background(tmp_path):
    """Hearts drawn on white only, masked to the heart. Without masks the adapter learns the white background with
    the subject. Training the masked-out area toward the base's own prediction (unmasked_target: base) keeps
    the background the base draws for the prompt, and still learns the heart.

    Not asserted, a limit of the toy base measured in docs/toy.md: on a *black* training background no latent
    mask helps, because the toy VAE's encoder carries the global background colour into the heart's own latents
    (they differ between black and white backgrounds as much as the background's latents do)."""
    from finetune.toy.score import subject_similarity
    from finetune.train.loop import _base_rows
    from finetune.train.validation import make_pipeline, render

    images = _masked_hearts(tmp_path / "white", "white")
    # the demo recipe with these hearts as its instance images (its preservation kept: the empty-caption world
    # images hold the unconditional prediction that guidance amplifies)
    common = [f"data.sources.0={{type: folder, path: {images}}}", "data.masks=null", "train.max_steps=200",
              "validation.every=0", "validation.metrics=[]", "logging.report_to=[]", "logging.progress=false"]
    # (a third mode, the masked-out area simply ignored (unmasked_weight 0, no target), is left out: it asserts
    # nothing the two below do not, and each mode is a 200-step run)
    modes = {"plain": [], "base": ["data.masks={unmasked_weight: 0.0, unmasked_target: base}"]}
    result, base = {}, None
    for name, extra in modes.items():
        t = run_trainer(DEMO, f"train.output_dir={tmp_path / name}", *common, *extra)
        v = t.recipe.validation
        rows = render(make_pipeline(t.comps, v), [TRIGGER], v.seeds, v, (64, 64), "cpu")[0]
        result[name] = (_background_brightness(rows), float(np.mean([subject_similarity(im, "red_heart")
                                                                     for im in rows])))
        if base is None:  # the untouched base's samples of the same prompt and seeds (adapters off)
            base = _background_brightness(_base_rows(t)[v.prompts.index(TRIGGER)])
    print(f"base: background brightness {base:.1f}")
    for name, (b, sim) in result.items():
        print(f"{name:8s}: background brightness {b:.1f} (off the base's by {abs(b - base):.1f}), "
              f"heart similarity {sim:.3f}")
    off = {name: abs(b - base) for name, (b, _) in result.items()}
    assert result["plain"][0] > 200 and off["plain"] > 80  # without masks the white background is learned
    assert off["base"] < 0.4 * off["plain"]  # held to the base outside the mask: the base's backgrounds stay
    assert result["base"][1] > 0.2  # and the heart is still learned
