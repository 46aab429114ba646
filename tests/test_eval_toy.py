"""On the toy base, CLIP-I and DINO (with the tiny evaluation models) agree with the toy scorer, the
learning check built by hand for the toy world (slow: a real toy LoRA run)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import run_trainer

ROOT = Path(__file__).resolve().parents[1]
METRICS = ["validation.metrics=[clip_i,clip_t,dino]", "validation.clip_model=toy", "validation.dino_model=toy",
           "validation.token=sks", "validation.class_word=heart", "validation.every=100", "train.keep_best=dino"]


def grid_cells(path: Path, rows: int, cols: int, side: int = 64, label: int = 14) -> list[list[Image.Image]]:
    """The images of a validation grid (finetune.train.validation.grid: a title line, then a label line
    above each row)."""
    with Image.open(path) as im:
        canvas = im.convert("RGB")
    return [[canvas.crop((j * side, label + i * (side + label) + label, (j + 1) * side,
                          label + i * (side + label) + label + side)) for j in range(cols)] for i in range(rows)]


def ranks(x) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    return r


def spearman(a, b) -> float:
    return float(np.corrcoef(ranks(np.asarray(a)), ranks(np.asarray(b)))[0, 1])


@pytest.mark.slow
def test_clip_i_and_dino_agree_with_the_toy_scorer(tmp_path):
    from finetune.toy.score import subject_similarity

    out = tmp_path / "run"
    t = run_trainer(ROOT / "recipes" / "toy" / "lora.yaml", f"train.output_dir={out}", "logging.report_to=[]",
                    "logging.progress=false", *METRICS)
    v = t.recipe.validation
    saved = json.loads((out / "samples" / "metrics.json").read_text())
    steps = sorted(int(s) for s in saved["steps"])
    assert steps == [0, 100, 200, 300, 400]
    scorer = t.run_metrics.scorer
    toy, values = [], {"clip_i": [], "dino": []}
    for step in steps:
        rows = grid_cells(out / "samples" / f"step-{step:06d}.png", len(v.prompts), len(v.seeds))
        per_image = scorer.per_image(rows, v.prompts)
        # the cut-out cells are the images the run scored: their row means are metrics.json's
        recorded = saved["steps"][str(step)]["rows"]
        for r, row in enumerate(rows):
            assert float(per_image["dino"][r].mean()) == pytest.approx(recorded[r]["dino"], abs=0.02)
            toy += [subject_similarity(im, v.score_subject) for im in row]
            for m in values:
                values[m] += per_image[m][r].tolist()
    agreement = {m: spearman(values[m], toy) for m in values}
    subject_rows = {s: saved["steps"][str(s)]["overall"]["dino"]["mean"] for s in steps}
    print(f"rank correlation with the toy scorer over {len(toy)} validation images: "
          + ", ".join(f"{m} {r:.2f}" for m, r in agreement.items()) + f"; DINO by step {subject_rows}")
    assert agreement["dino"] > 0.6 and agreement["clip_i"] > 0.6, agreement
    # DINO's best step is one the toy scorer also rates (near) best for the subject prompt
    toy_by_step = {int(s): p[v.prompts[0]] for s, p in json.loads((out / "samples" / "scores.json").read_text()).items()}
    best = saved["best_step"]
    print(f"toy scorer by step {toy_by_step}; DINO's best step {best}")
    assert subject_rows[best] > subject_rows[0] + 0.1 and toy_by_step[best] > toy_by_step[0] + 0.1
    assert toy_by_step[best] >= max(toy_by_step.values()) - 0.05
    # the kept folder holds that step's weights: rendering the grid again with them gives that step's score
    import torch

    from finetune.eval.compare import Candidate, Sampling, render_candidate
    from finetune.models.components import load_components
    from finetune.sections import ModelSection

    sampling = Sampling(v.prompts, v.seeds, v.steps, v.guidance_scale, v.negative_prompt, v.scheduler, (64, 64))
    rows = render_candidate(Candidate("lora", str(out / f"best-step-{best:06d}")), "toy", sampling,
                            lambda base: load_components(ModelSection(base=base)), "cpu", torch.float32)
    again = scorer.score(rows, v.prompts).means()["dino"]
    print(f"best step {best}: DINO {subject_rows[best]:.4f} recorded, {again:.4f} from the kept export")
    assert again == pytest.approx(subject_rows[best], abs=2e-3)
    assert all(abs(again - subject_rows[s]) > 2e-3 for s in steps if s != best)
