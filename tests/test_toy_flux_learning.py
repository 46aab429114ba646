"""Does FLUX-style training really learn? LoRA and pivotal tuning teach the FLUX-shaped toy base the held-out
subject through rectified flow, and every exported form gives the trained model's images in a stock
FluxPipeline (slow: minutes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import run_trainer

ROOT = Path(__file__).resolve().parents[1]
UNRELATED = "a blue square"
SEEDS = list(range(8))


def _blue_squares(images) -> tuple[int, int]:
    """(right colour, right shape) counts of 'a blue square' samples."""
    from finetune.toy.score import colour_of, shape_of

    return sum(colour_of(im) == "blue" for im in images), sum(shape_of(im) == "square" for im in images)


def _stock(load=None):
    """The FLUX toy base in a stock FluxPipeline, optionally with `load(pipe)` applied."""
    from finetune.toy import toy_path
    from finetune.toy.evaluate import load_pipeline

    pipe = load_pipeline(toy_path("toy-flux"))
    if load is not None:
        load(pipe)
    return pipe


def _draw(pipe, prompt: str) -> list:
    from finetune.toy.evaluate import generate

    return generate(pipe, [prompt], SEEDS, steps=28, guidance=5.0)


def _similarity(images, subject: str) -> float:
    from finetune.toy.score import subject_similarity

    return float(np.mean([subject_similarity(im, subject) for im in images]))


def _learned(tmp_path: Path, recipe: str):
    t = run_trainer(ROOT / "recipes" / "toy" / recipe, f"train.output_dir={tmp_path / 'run'}",
                    "logging.progress=false")
    scores = json.loads((tmp_path / "run" / "samples" / "scores.json").read_text())
    steps = sorted(scores, key=int)
    trigger = t.recipe.validation.prompts[0]
    before, after = scores[steps[0]][trigger], scores[steps[-1]][trigger]
    print(f"{recipe}: {t.recipe.validation.score_subject} similarity for '{trigger}': base {before:.3f} -> "
          f"trained {after:.3f}")
    assert steps[0] == "0" and int(steps[-1]) == t.recipe.train.max_steps
    assert before < 0.1 and after > before + 0.3, (before, after)  # far above the base
    return t, after


def _keeps_the_unrelated_prompt(pipe):
    base, tuned = _blue_squares(_draw(_stock(), UNRELATED)), _blue_squares(_draw(pipe, UNRELATED))
    print(f"'{UNRELATED}' (colour, shape) of 8: base {base}, tuned {tuned}")
    assert tuned[0] >= base[0] - 1 and tuned[1] >= base[1] - 1  # no more than 1 of 8 lost, either way


@pytest.mark.slow
def test_toy_flux_lora_learns_and_every_form_gives_the_trained_images(tmp_path):
    from finetune.export.convert import convert_lora

    t, after = _learned(tmp_path, "flux_lora.yaml")
    run = tmp_path / "run"
    subject = t.recipe.validation.score_subject
    pipe = _stock(lambda p: p.load_lora_weights(run))
    hearts = _draw(pipe, t.recipe.validation.prompts[0])
    # the stock pipeline with the diffusers file draws what the run's last grid showed
    assert abs(_similarity(hearts, subject) - after) < 0.02, (_similarity(hearts, subject), after)
    _keeps_the_unrelated_prompt(pipe)
    reference = np.stack([np.asarray(im, dtype=np.float32) for im in hearts])
    name = t.recipe.export.name or run.name
    for form in (f"{name}.safetensors", f"{name}_bfl.safetensors"):  # ComfyUI names, BFL/sd-scripts names
        assert (run / form).is_file(), form
        folder = convert_lora(run / form, tmp_path / form / "pytorch_lora_weights.safetensors", "diffusers").parent
        images = _draw(_stock(lambda p, f=folder: p.load_lora_weights(f)), t.recipe.validation.prompts[0])
        diff = float(np.abs(np.stack([np.asarray(im, dtype=np.float32) for im in images]) - reference).max())
        print(f"{form}: largest pixel difference from the diffusers file {diff:.1f} / 255")
        assert diff <= 2.0, form


@pytest.mark.slow
def test_toy_flux_pivotal_learns_the_subject(tmp_path):
    from finetune.export.embeddings import load_into_pipeline

    t, after = _learned(tmp_path, "flux_pivotal.yaml")
    run = tmp_path / "run"

    def load(pipe):
        pipe.load_lora_weights(run)
        load_into_pipeline(pipe, run / f"{t.recipe.export.name or run.name}_emb.safetensors", family=t.comps.family)

    pipe = _stock(load)
    images = _draw(pipe, t.recipe.validation.prompts[0])
    assert abs(_similarity(images, t.recipe.validation.score_subject) - after) < 0.02
    _keeps_the_unrelated_prompt(pipe)
