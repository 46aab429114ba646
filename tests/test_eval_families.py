"""Metrics on the flow-matching families (tiny SD3 and FLUX built offline): a run scores its grids, keeps the
best step, and that kept export, rendered again through the family's own pipeline by the evaluation code
(what tools/evaluate.py runs), gives the number the run recorded for it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, draw_images, run_trainer, write_recipe

PROMPTS = ["a sks circle", "a blue square"]
MODEL = {"sd3": {}, "flux": {"max_sequence_length": 32}}
TARGETS = {"sd3": "attention", "flux": "attention_mlp"}


def run_tool(*args: str) -> subprocess.CompletedProcess:
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate.py"), *args], capture_output=True,
                          text=True, env=env, timeout=600)


@pytest.fixture(scope="module", params=["sd3", "flux"])
def family_base(request, tmp_path_factory) -> tuple[str, Path]:
    from finetune.models.tiny import build_tiny

    return request.param, build_tiny(request.param, tmp_path_factory.mktemp("tiny") / request.param)


def test_kept_best_step_renders_its_recorded_score_through_the_family(tmp_path, family_base):
    import torch

    from finetune.eval.compare import Candidate, Sampling, evaluate
    from finetune.models.base import resolve_base
    from finetune.models.components import LoadOptions, load_components

    family, base = family_base
    images = draw_images(tmp_path / "images")
    recipe = write_recipe(
        tmp_path, base, images, model=MODEL[family],
        method={"name": "lora", "rank": 4, "alpha": 4, "targets": TARGETS[family]},
        train={"max_steps": 6, "lr": 1e-2, "keep_best": "dino"},
        validation={"prompts": PROMPTS, "seeds": [0, 1], "steps": 2, "every": 2, "at_start": True,
                    "width": 64, "height": 64, "metrics": ["clip_i", "clip_t", "dino"], "token": "sks",
                    "class_word": "circle", "clip_model": "toy", "dino_model": "toy"})
    t = run_trainer(recipe)
    assert t.comps.family.name == family
    out = Path(t.cfg.output_dir)
    saved = json.loads((out / "samples" / "metrics.json").read_text())
    dino = {int(s): d["overall"]["dino"]["mean"] for s, d in saved["steps"].items()}
    assert sorted(dino) == [0, 2, 4, 6] and (out / "metrics.png").is_file()
    best = saved["best_step"]
    assert best == max((s for s in dino if s > 0), key=lambda s: dino[s])
    assert sorted(p.name for p in out.glob("best-step-*")) == [f"best-step-{best:06d}"]

    v = t.recipe.validation
    sampling = Sampling(v.prompts, v.seeds, v.steps, v.guidance_scale, v.negative_prompt, v.scheduler, (64, 64))
    results = dict(evaluate([Candidate("base", str(base)), Candidate("lora", str(out / f"best-step-{best:06d}"))],
                            t.run_metrics.scorer, sampling, str(base),
                            lambda b: load_components(resolve_base(b), LoadOptions(**MODEL[family])), "cpu", torch.float32))
    again = {label.split()[0]: sc.means()["dino"] for label, sc in results.items()}
    spread = max(dino.values()) - min(dino.values())
    print(f"{family}: DINO by step {dino}; best {best}; re-rendered base {again['base']:.6f}, "
          f"kept export {again['lora']:.6f}")
    assert spread > 5e-4, "training did not change the grids; the test would prove nothing"
    # the same images as the run's grids: the family encodes the prompts as the run did (FLUX's T5 at the
    # recipe's max_sequence_length, not the pipeline's 512) and the kept export holds that step's weights
    assert again["lora"] == pytest.approx(dino[best], abs=5e-5)
    assert again["base"] == pytest.approx(dino[0], abs=5e-5)
    if family == "flux":  # the CLI on the same export, told the run's T5 length, gives the same number
        kept = out / f"best-step-{best:06d}"
        proc = run_tool("--base", str(base), "--lora", str(kept), "--max-sequence-length", "32",
                        "--references", str(images), "--prompts", *PROMPTS, "--token", "sks",
                        "--class-word", "circle", "--seeds", "0", "1", "--steps", "2", "--width", "64",
                        "--height", "64", "--clip-model", "toy", "--dino-model", "toy", "--device", "cpu",
                        "--out", str(tmp_path / "eval"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        cli = json.loads((tmp_path / "eval" / "results.json").read_text())["candidates"][f"lora {kept}"]
        assert cli["overall"]["dino"]["mean"] == pytest.approx(dino[best], abs=5e-5)
