"""Metrics in a training run: metrics.json, metrics.png, tracker logs, the model card, train.keep_best; and the
recipe keys that drive them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.errors import RecipeError
from finetune.recipe import load_recipe
from tests.helpers import run_trainer, write_recipe

PROMPTS = ["a sks circle", "a blue square"]


def metrics_recipe(tmp_path, base, images, **extra):
    sections = {
        "validation": {"prompts": PROMPTS, "seeds": [0, 1], "steps": 2, "every": 2, "at_start": True,
                       "guidance_scale": 3.0, "metrics": ["clip_i", "clip_t", "dino"], "token": "sks",
                       "class_word": "circle", "clip_model": "toy", "dino_model": "toy"},
        "train": {"max_steps": 6, "keep_best": "dino", "lr": 3e-3},
        "export": {"formats": ["diffusers"], "model_card": True},
        "logging": {"report_to": ["tensorboard"]},
    }
    from finetune.recipe import deep_merge

    return write_recipe(tmp_path, base, images, **deep_merge(sections, extra))


def tensorboard_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for events in log_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def test_run_with_metrics_writes_logs_and_keeps_the_best_step(tmp_path, tiny_base, images):
    from safetensors import safe_open

    from finetune.eval.references import reference_images

    t = run_trainer(metrics_recipe(tmp_path, tiny_base, images))
    out = Path(t.cfg.output_dir)
    saved = json.loads((out / "samples" / "metrics.json").read_text())
    steps = {int(s): d for s, d in saved["steps"].items()}
    assert sorted(steps) == [0, 2, 4, 6]
    assert saved["references"] == len(reference_images(t.recipe)) == 6  # the first source's images
    for d in steps.values():
        assert set(d["overall"]) == {"clip_i", "clip_t", "dino"}
        assert [r["prompt"] for r in d["rows"]] == PROMPTS and [r["subject"] for r in d["rows"]] == [True, False]
        # the subject metrics average the 'sks' row only, CLIP-T every row
        assert d["overall"]["dino"]["mean"] == pytest.approx(d["rows"][0]["dino"], abs=1e-6)
        assert d["overall"]["clip_t"]["mean"] == pytest.approx((d["rows"][0]["clip_t"] + d["rows"][1]["clip_t"]) / 2,
                                                               abs=1e-6)
        assert d["overall"]["dino"]["n"] == 2 and d["overall"]["clip_t"]["n"] == 4
    dino = {s: d["overall"]["dino"]["mean"] for s, d in steps.items()}
    assert len(set(dino.values())) == 4, "training did not change the images; the choice would be empty"
    best = max((s for s in dino if s > 0), key=lambda s: dino[s])
    assert saved["best_step"] == best
    kept = sorted(p.name for p in out.glob("best-step-*"))
    assert kept == [f"best-step-{best:06d}"]  # earlier bests were replaced
    with safe_open(str(out / kept[0] / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert f.metadata()["finetune.steps"] == str(best)  # exported at that step
    assert (out / "metrics.png").stat().st_size > 5000
    logged = tensorboard_scalars(out / "logs")
    assert logged["metrics/dino"] == pytest.approx(dino, abs=1e-5)
    card = (out / "README.md").read_text()
    assert "## Metrics" in card and f"**{best} (best)**" in card and f"`best-step-{best:06d}/`" in card


def test_metrics_history_survives_a_resume(tmp_path):
    from finetune.eval.formulas import Estimate
    from finetune.eval.run import RunMetrics
    from finetune.eval.scoring import Scores

    recipe = load_recipe(metrics_recipe(tmp_path, "toy", tmp_path))
    out = tmp_path / "run"
    first = RunMetrics(recipe, out, "cpu", None)
    first.history = {s: Scores({"dino": Estimate(v, v, v, 1)}) for s, v in [(0, 0.1), (2, 0.5), (4, 0.9), (6, 0.2)]}
    first._write()
    assert first.best_step() == 4
    first.keep_best(2, lambda folder: (folder / "w.safetensors").write_bytes(b"2"))
    (out / "best-step-000004").mkdir()  # a best step kept after the checkpoint the run resumes from
    resumed = RunMetrics(recipe, out, "cpu", None, resume_step=3)
    assert sorted(resumed.history) == [0, 2] and resumed.best_step() == 2
    # that step is trained again, so its export goes with its numbers; the earlier one stays
    assert sorted(p.name for p in out.glob("best-step-*")) == ["best-step-000002"]
    assert RunMetrics(recipe, out, "cpu", None).history == {}  # a fresh run starts a fresh history


@pytest.mark.parametrize(("override", "message"), [
    ("validation.metrics=[dino]", "validation.prompts"),
    ("validation.metrics=[clip_x]", "'clip_i', 'clip_t' or 'dino'"),
    ("validation.prompts=dreambench", "validation.class_word"),
    ("validation.prompts=dreambnch", "did you mean 'dreambench'"),
    ("train.keep_best=dino", "validation.metrics does not compute"),
    ("train.keep_best=dnio", "did you mean 'dino'"),
    ("train.keep_best={dino: 0}", "positive"),
])
def test_recipe_keys_fail_in_one_line(tmp_path, override, message):
    path = write_recipe(tmp_path, "toy", tmp_path, validation={"prompts": ["a sks dog"]})
    extra = [override]
    if override.startswith("validation.metrics=[dino]"):
        extra.append("validation.prompts=[]")
    with pytest.raises(RecipeError) as e:
        load_recipe(path, extra)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_prompt_set_in_a_recipe(tmp_path):
    path = write_recipe(tmp_path, "toy", tmp_path, validation={
        "prompts": "dreambench_live", "token": "sks", "class_word": "dog", "metrics": ["clip_t", "dino"]},
        train={"keep_best": {"dino": 1, "clip_t": 0.5}})
    recipe = load_recipe(path)
    assert len(recipe.validation.prompts) == 25 and recipe.validation.prompts[0].startswith("a sks dog ")
    assert recipe.train.keep_best == {"dino": 1.0, "clip_t": 0.5}
    # the resolved recipe (what a run stores) loads again unchanged
    again = load_recipe(path, [f"validation.prompts={json.dumps(recipe.validation.prompts)}"])
    assert again.validation.prompts == recipe.validation.prompts
