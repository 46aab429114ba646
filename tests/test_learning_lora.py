"""Does LoRA really learn? The toy recipe teaches the toy base a held-out subject (slow: minutes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import run_trainer

ROOT = Path(__file__).resolve().parents[1]
UNRELATED = "a blue square"


@pytest.mark.slow
def test_toy_lora_learns_the_held_out_subject(tmp_path):
    from finetune.toy.score import colour_of, shape_of, subject_similarity

    t = run_trainer(ROOT / "recipes" / "toy" / "lora.yaml", f"train.output_dir={tmp_path / 'run'}",
                    "logging.report_to=[]", "logging.progress=false")
    scores = json.loads((tmp_path / "run" / "samples" / "scores.json").read_text())
    steps = sorted(scores, key=int)
    subject = t.recipe.validation.score_subject
    trigger = t.recipe.validation.prompts[0]
    before, after = scores[steps[0]][trigger], scores[steps[-1]][trigger]
    print(f"{subject} similarity for '{trigger}': base {before:.3f} -> LoRA {after:.3f}")
    assert steps[0] == "0" and int(steps[-1]) == t.recipe.train.max_steps
    assert after > before + 0.2, (before, after)

    # an unrelated prompt still draws what the base draws (a blue square), and nothing like the subject
    from finetune.train.validation import make_pipeline, render

    v = t.recipe.validation
    lora_rows = render(make_pipeline(t.comps, v), [UNRELATED], v.seeds, v, (64, 64), "cpu")[0]
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
