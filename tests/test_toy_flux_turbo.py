"""The toy's few-step student (toy-flux-turbo, distilled from the FLUX toy base) and its de-distillation training
adapter: the distillation samples where FluxPipeline samples, the shipped student draws the world at 4 steps
without CFG better than its teacher does there, the adapter brings it back toward the teacher, and (slow) the best
route teaches it the red heart within docs/toy.md's bounds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.helpers import ROOT


def test_the_student_learns_at_the_sigmas_fluxpipeline_samples():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    from finetune.toy import build_flux, build_flux_turbo

    ours = build_flux_turbo.knots(build_flux.make_scheduler())
    sched = build_flux.make_scheduler()
    c = sched.config
    mu = calculate_shift(64, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    retrieve_timesteps(sched, 4, "cpu", sigmas=np.linspace(1.0, 1 / 4, 4), mu=mu)  # what FluxPipeline does
    assert torch.allclose(ours, sched.sigmas.float()) and len(ours) == 5 and ours[-1] == 0
    grid = build_flux_turbo.fine_grid(ours)
    assert len(grid) == 4 * build_flux_turbo.SUB + 1
    assert torch.equal(grid[:: build_flux_turbo.SUB], ours)  # every student sigma is a teacher step
    assert bool((grid[1:] < grid[:-1]).all())


def test_the_shipped_student_is_the_base_but_its_transformer():
    from finetune.toy import toy_path

    base, student = toy_path("toy-flux"), toy_path("toy-flux-turbo")
    files = {p.relative_to(base) for p in base.rglob("*") if p.is_file()}
    theirs = {p.relative_to(student) for p in student.rglob("*") if p.is_file() and "training_adapter" not in p.parts}
    assert files == theirs
    differ = {str(f) for f in files if (base / f).read_bytes() != (student / f).read_bytes()}
    assert differ == {"transformer/diffusion_pytorch_model.safetensors", "toy_build.json"}  # git stores the rest once
    info = json.loads((student / "toy_build.json").read_text())
    assert info["distilled_from"] == "toy-flux" and info["sampler"]["steps"] == 4 and info["build_cpu_minutes"] > 0


def _following(transformer, guidance: float, seeds=(0, 1)) -> float:
    from diffusers import FluxPipeline

    from finetune.toy import evaluate, toy_path

    pipe = evaluate.load_pipeline(toy_path("toy-flux"))
    pipe = FluxPipeline(**{**pipe.components, "transformer": transformer})
    pipe.set_progress_bar_config(disable=True)
    summary, _ = evaluate.prompt_following(pipe, seeds=seeds, steps=4, guidance=guidance)
    return summary["both_acc"]


def test_the_student_draws_the_world_in_4_steps_without_cfg():
    """Colour and shape both right, every 'a {colour} {shape}' prompt x 2 seeds, 4 Euler steps: the student
    without CFG against the teacher without CFG (docs/toy.md has the full numbers)."""
    from diffusers import FluxTransformer2DModel

    from finetune.toy import toy_path

    student = FluxTransformer2DModel.from_pretrained(toy_path("toy-flux-turbo") / "transformer", dtype=torch.float32)
    teacher = FluxTransformer2DModel.from_pretrained(toy_path("toy-flux") / "transformer", dtype=torch.float32)
    mine, theirs = _following(student, 1.0), _following(teacher, 1.0)
    print(f"4 steps, no CFG: student {mine:.3f}, teacher {theirs:.3f}")
    assert mine >= 0.7 and mine >= theirs + 0.15


def test_the_training_adapter_brings_the_student_back_to_the_base():
    """On the inputs a LoRA trains on (noisy world latents, shifted logit-normal sigmas, world and empty captions),
    student + adapter predicts what the base predicts far better than the student alone."""
    from diffusers import FluxPipeline

    from finetune.models.families import FAMILIES
    from finetune.models.training_adapter import TrainingAdapter, adapter_file
    from finetune.toy import build_flux, toy_path
    from finetune.toy.build_flux_train import FlowObjective, prepare_data

    base = FluxPipeline.from_pretrained(toy_path("toy-flux"), dtype=torch.float32)
    student = FluxPipeline.from_pretrained(toy_path("toy-flux-turbo"), dtype=torch.float32).transformer
    adapter = TrainingAdapter.attach(adapter_file("toy-flux-turbo-adapter"), {"transformer": student}, FAMILIES["flux"])
    text = {k: getattr(base, k) for k in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}
    data = prepare_data(base.vae, text, 32, seed=99)  # world images none of the builds saw
    objective = FlowObjective(base.vae.config, build_flux.make_scheduler(), data["latents"].shape[-1])
    g = torch.Generator().manual_seed(0)
    x0 = (data["latents"] - objective.shift) * objective.scale
    s = objective.sigmas(len(x0), g)
    xs = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=g)
    caps = data["caps"][:, 0] * (torch.rand(len(x0), generator=g) > 0.3)  # some empty captions
    kw = dict(hidden_states=objective.pack(xs, len(x0), x0.shape[1], objective.hw, objective.hw), timestep=s,
              pooled_projections=data["pooled"][caps], encoder_hidden_states=data["t5"][caps],
              txt_ids=objective.txt_ids, img_ids=objective.img_ids)
    with torch.no_grad():
        target = base.transformer(**kw).sample
        applied = (student(**kw).sample - target).pow(2).mean()
        with adapter.off():
            alone = (student(**kw).sample - target).pow(2).mean()
    print(f"MSE to the base's prediction: student {alone:.4f}, with the adapter {applied:.4f}")
    assert applied < 0.5 * alone


@pytest.mark.slow
def test_route_bounds_at_4_steps(tmp_path):
    """docs/toy.md's best route on the toy (its table's step-200 column: half the recipe's 400 steps keeps the
    test within CI's budget): the heart learned, the unrelated prompts kept, at the student's 4 steps without CFG."""
    from tests.helpers import run_trainer

    t = run_trainer(ROOT / "recipes" / "toy" / BEST_ROUTE, f"train.output_dir={tmp_path / 'run'}",
                    "logging.progress=false", "train.max_steps=200", "train.checkpoint_every=0")
    scores = json.loads((tmp_path / "run" / "samples" / "scores.json").read_text())
    last, first = scores[str(t.recipe.train.max_steps)], scores["0"]
    n = len(t.recipe.validation.seeds)
    unrelated = [p for p in t.recipe.validation.prompts if p != "a sks heart"]
    colour = sum(last[f"{p} | colour"] for p in unrelated) * n
    shape = sum(last[f"{p} | shape"] for p in unrelated) * n
    base_colour = sum(first[f"{p} | colour"] for p in unrelated) * n
    base_shape = sum(first[f"{p} | shape"] for p in unrelated) * n
    drift = float(np.mean([last[f"{p} | drift"] for p in unrelated]))
    print(f"heart {last['a sks heart']:.3f}; unrelated colour {colour:.0f} (base {base_colour:.0f}), shape "
          f"{shape:.0f} (base {base_shape:.0f}) of {n * len(unrelated)}; drift {drift:.3f}")
    assert first["a sks heart"] < 0.1 and last["a sks heart"] >= HEART_AT_LEAST
    assert colour >= base_colour - 3 and shape >= base_shape - 3
    assert drift <= DRIFT_AT_MOST


BEST_ROUTE, HEART_AT_LEAST, DRIFT_AT_MOST = "flux_turbo_on_base.yaml", 0.4, 0.1  # docs/toy.md @200: 0.512, 0.050
