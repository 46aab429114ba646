"""Stable Diffusion 3 on a tiny MMDiT built offline: the family's text conditioning and rectified-flow loss
against diffusers' own helpers, the timestep samplers against their densities, every adapter and `full`
training and reloading in a stock StableDiffusion3Pipeline, DDP and exact resume."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import ROOT, draw_images, killed_and_resumed, one_vs_two_processes, write_recipe

CAPTIONS = ["a red circle on a white background", "blue", ""]


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    from finetune.models.tiny import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("tiny") / "sd3")


def sd3_recipe(tmp_path: Path, base: Path, **sections) -> Path:
    from finetune.recipe import deep_merge

    base_sections = {"method": {"name": "lora", "rank": 4, "alpha": 2, "targets": "attention"},
                     "train": {"max_steps": 3, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 0, "seed": 3}}
    path = write_recipe(tmp_path, base, draw_images(tmp_path / "images"), **deep_merge(base_sections, sections))
    if sections.get("method", {}).get("name") not in (None, "lora"):  # another method: none of LoRA's keys
        data = yaml.safe_load(path.read_text())
        data["method"] = sections["method"]
        path.write_text(yaml.safe_dump(data))
    return path


def components(base: Path, **options):
    from finetune.models.base import resolve_base
    from finetune.models.components import LoadOptions, load_components

    return load_components(resolve_base(str(base)), LoadOptions(**options))


def test_detected_as_sd3_and_text_matches_the_pipeline(tiny_sd3):
    from diffusers import StableDiffusion3Pipeline

    comps = components(tiny_sd3)
    assert comps.family.name == "sd3" and comps.denoiser_name == "transformer"
    assert comps.prediction_type == "flow"
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    with torch.no_grad():
        ours = comps.family.encode_prompt(comps, CAPTIONS, "cpu")
        embeds, _, pooled, _ = pipe.encode_prompt(CAPTIONS, None, None, device="cpu",
                                                  do_classifier_free_guidance=False, max_sequence_length=256)
    assert ours["prompt_embeds"].shape == (3, 77 + 256, 32)
    assert torch.allclose(ours["prompt_embeds"], embeds, atol=1e-6)
    assert torch.allclose(ours["pooled_prompt_embeds"], pooled, atol=1e-6)


def test_without_t5_the_t5_part_is_zeros_as_in_the_pipeline(tiny_sd3):
    from diffusers import StableDiffusion3Pipeline

    comps = components(tiny_sd3, drop_text_encoders=("text_encoder_3",), max_sequence_length=16)
    assert comps.text_encoder_names == ("text_encoder", "text_encoder_2")
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, text_encoder_3=None, tokenizer_3=None)
    with torch.no_grad():
        ours = comps.family.encode_prompt(comps, CAPTIONS, "cpu")
        embeds = pipe.encode_prompt(CAPTIONS, None, None, device="cpu", do_classifier_free_guidance=False,
                                    max_sequence_length=16)[0]
    assert ours["prompt_embeds"].shape == (3, 77 + 16, 32)
    assert torch.equal(ours["prompt_embeds"][:, 77:], torch.zeros(3, 16, 32))
    assert torch.allclose(ours["prompt_embeds"], embeds, atol=1e-6)


def _independent_flow_loss(transformer, scheduler_config, latents, text, seeds_gen, sampling, weighting, mu=None):
    """The SD3 training loss written out with diffusers' helpers and the scheduler's sigmas, as diffusers'
    train_dreambooth_lora_sd3.py computes it (one generator per example: noise first, then u)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    noise, u = [], []
    for g in seeds_gen:
        noise.append(torch.randn(latents.shape[1:], generator=g))
        u.append(compute_density_for_timestep_sampling(sampling, 1, logit_mean=0.0, logit_std=1.0,
                                                       mode_scale=1.29, generator=g))
    noise, u = torch.stack(noise), torch.cat(u)
    indices = (u * sched.config.num_train_timesteps).long()
    timesteps = sched.timesteps[indices]
    sigmas = torch.stack([sched.sigmas[(sched.timesteps == t).nonzero().item()] for t in timesteps])
    if mu is not None:
        sigmas = sched.time_shift(mu, 1.0, sigmas)
        timesteps = sigmas * 1000
    s = sigmas.view(-1, 1, 1, 1)
    noisy = (1 - s) * latents + s * noise
    pred = transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=text["prompt_embeds"],
                       pooled_projections=text["pooled_prompt_embeds"], return_dict=False)[0]
    weights = compute_loss_weighting_for_sd3(weighting, sigmas)
    per = (weights.view(-1, 1, 1, 1).float() * (pred.float() - (noise - latents).float()) ** 2)
    return per.reshape(latents.shape[0], -1).mean(1).mean()


@pytest.mark.parametrize("sampling,weighting,resolution", [
    ("logit_normal", "none", False), ("mode", "cosmap", False), ("uniform", "sigma_sqrt", True),
])
def test_flow_loss_equals_diffusers_helpers(tmp_path, tiny_sd3, sampling, weighting, resolution):
    from finetune.recipe import load_recipe
    from finetune.train.setup import make_accelerator
    from finetune.train.trainer import Trainer
    from tests.helpers import first_step_generators

    flow = {"timestep_sampling": sampling, "weighting": weighting, "resolution_shift": resolution}
    recipe = load_recipe(sd3_recipe(tmp_path, tiny_sd3, train={"flow": flow}))
    t = Trainer(recipe, make_accelerator(recipe))
    batch = next(iter(t.data.loader(0)))
    with torch.no_grad():
        loss, _ = t.compute_loss(batch)
        latents = t.encode_latents(batch["pixel_values"])
        text = t.encode_text(batch["captions"])
        scheme = {"uniform": "none"}.get(sampling, sampling)
        base_config = dict(t.comps.scheduler.config) | ({"shift": 1.0, "use_dynamic_shifting": True} if resolution else {})
        mu = t.objective.mu(latents) if resolution else None
        ref = _independent_flow_loss(t.comps.denoiser, base_config, latents, text,
                                     first_step_generators(recipe.train.seed, 0, 0, latents.shape[0]), scheme,
                                     weighting, mu)
    assert abs(float(loss) - float(ref)) < 1e-6, (float(loss), float(ref))


def _mode_cdf(u, s):
    """CDF of u = f(v) = 1 - v - s (cos^2(pi v / 2) - 1 + v), v ~ U(0, 1): f decreases, so F(u) = 1 - f^-1(u)."""
    lo, hi = torch.zeros_like(u), torch.ones_like(u)
    for _ in range(60):
        mid = (lo + hi) / 2
        f = 1 - mid - s * (torch.cos(math.pi * mid / 2) ** 2 - 1 + mid)
        lo, hi = torch.where(f > u, mid, lo), torch.where(f > u, hi, mid)
    return 1 - (lo + hi) / 2


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "mode", "sigmoid"])
def test_timestep_sampler_follows_its_density(sampling):
    """Kolmogorov-Smirnov against the exact CDF, 4000 draws from per-example generators (fixed seeds)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from finetune.train.objectives import FlowObjective
    from tests.helpers import first_step_generators

    obj = FlowObjective(FlowMatchEulerDiscreteScheduler(), sampling, "none", logit_mean=0.3, logit_std=0.8,
                        mode_scale=1.29, sigmoid_scale=1.5)
    u = torch.cat([obj.draw_u(g) for g in first_step_generators(7, 0, 0, 4000)]).double().sort().values
    if sampling == "uniform":
        cdf = u
    elif sampling == "mode":
        cdf = _mode_cdf(u, 1.29)
    else:
        mean, std = (0.3, 0.8) if sampling == "logit_normal" else (0.0, 1.5)
        cdf = 0.5 * (1 + torch.erf((torch.log(u / (1 - u)) - mean) / (std * math.sqrt(2))))
    n = len(u)
    ks = max(float((torch.arange(1, n + 1) / n - cdf).abs().max()), float((cdf - torch.arange(n) / n).abs().max()))
    assert ks < 1.63 / math.sqrt(n), ks  # the 1% critical value: a wrong density lands far beyond it
    # and a wrong density does fail: uniform draws tested against the logit-normal CDF
    if sampling == "logit_normal":
        grid = torch.linspace(0.0005, 0.9995, n, dtype=torch.float64)
        wrong = 0.5 * (1 + torch.erf((torch.log(grid / (1 - grid)) - 0.3) / (0.8 * math.sqrt(2))))
        assert float((torch.arange(1, n + 1) / n - wrong).abs().max()) > 1.63 / math.sqrt(n)


def test_static_shift_follows_the_sd3_formula():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from finetune.train.objectives import FlowObjective

    obj = FlowObjective(FlowMatchEulerDiscreteScheduler(shift=3.0), "uniform", "none")
    u = torch.tensor([0.0, 0.25, 0.5, 0.999])
    base = 1 - torch.floor(u * 1000) / 1000  # the unshifted grid: sigmas 1 .. 1/1000, timesteps descending
    expected = 3 * base / (1 + 2 * base)
    assert torch.allclose(obj.sigmas_for(u, torch.zeros(4, 16, 8, 8)), expected, atol=1e-6)


def fixed_transformer_output(transformer, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 16, 16, generator=g)
    ctx = torch.randn(2, 20, 32, generator=g)
    pooled = torch.randn(2, 32, generator=g)
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=torch.tensor([300.0, 800.0]), encoder_hidden_states=ctx,
                           pooled_projections=pooled, return_dict=False)[0]


def run(recipe: Path, *overrides: str):
    from finetune.recipe import load_recipe
    from finetune.train.trainer import train

    train(load_recipe(recipe, list(overrides)))


@pytest.mark.parametrize("adapter,dora", [("lora", False), ("lora", True), ("loha", False), ("lokr", False)])
def test_every_adapter_trains_and_reloads_in_a_stock_pipeline(tmp_path, tiny_sd3, adapter, dora):
    from diffusers import StableDiffusion3Pipeline

    from finetune.export.lora import load_peft_adapter
    from finetune.recipe import load_recipe
    from finetune.train.setup import make_accelerator
    from finetune.train.trainer import Trainer

    recipe = load_recipe(sd3_recipe(tmp_path, tiny_sd3, method={"adapter": adapter, "use_dora": dora}))
    t = Trainer(recipe, make_accelerator(recipe))
    before = fixed_transformer_output(components(tiny_sd3).denoiser)
    t.run()
    trained = fixed_transformer_output(t.comps.denoiser)
    assert float((trained - before).abs().max()) > 1e-4, "the adapter did not change the output"
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    out = tmp_path / "out"
    if adapter == "lora":
        pipe.load_lora_weights(out)
    else:
        assert load_peft_adapter(out / "peft_adapter.safetensors", {"transformer": pipe.transformer}) == ["transformer"]
    assert float((fixed_transformer_output(pipe.transformer) - trained).abs().max()) < 1e-4


def test_full_trains_the_transformer_and_reloads(tmp_path, tiny_sd3):
    from diffusers import StableDiffusion3Pipeline

    from finetune.recipe import load_recipe
    from finetune.train.setup import make_accelerator
    from finetune.train.trainer import Trainer

    recipe = load_recipe(sd3_recipe(tmp_path, tiny_sd3, method={"name": "full"},
                                    export={"formats": ["diffusers"]}, train={"lr": 1e-4}))
    t = Trainer(recipe, make_accelerator(recipe))
    t.run()
    trained = fixed_transformer_output(t.comps.denoiser)
    reloaded = StableDiffusion3Pipeline.from_pretrained(tmp_path / "out" / "model")
    assert float((fixed_transformer_output(reloaded.transformer) - trained).abs().max()) < 1e-5
    assert float((trained - fixed_transformer_output(components(tiny_sd3).denoiser)).abs().max()) > 1e-5


def test_text_is_cached_and_encoders_released_by_default(tmp_path, tiny_sd3):
    from finetune.recipe import load_recipe
    from finetune.train.setup import make_accelerator
    from finetune.train.trainer import Trainer

    recipe = load_recipe(sd3_recipe(tmp_path, tiny_sd3, validation={"prompts": ["a red circle"], "steps": 2,
                                                                    "seeds": [0], "width": 64, "height": 64}))
    t = Trainer(recipe, make_accelerator(recipe))
    assert recipe.data.cache_text is True
    assert all(p.device.type == "cpu" for e in t.comps.text_encoders for p in e.parameters())
    assert set(t.prompt_cache) == {"a red circle", ""}
    t.run()
    assert (tmp_path / "out" / "samples" / "step-000003.png").is_file()


@pytest.mark.parametrize("override,needle", [
    ("train.min_snr_gamma=5", "train.min_snr_gamma is a DDPM"),
    ("model.prediction_type=v_prediction", "model.prediction_type 'v_prediction' does not apply"),
    ("validation.scheduler=ddim", "validation.scheduler 'ddim' is a DDPM sampler"),
    ("method.targets=locon", "not a preset of the sd3 family"),
    ("model.drop_text_encoders=[text_encoder]", "text_encoder cannot be dropped"),
])
def test_options_that_do_not_fit_sd3_are_refused_at_recipe_time(tmp_path, tiny_sd3, override, needle):
    recipe = sd3_recipe(tmp_path, tiny_sd3)
    out = subprocess.run([sys.executable, "-m", "finetune", str(recipe), override, "--check"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and needle in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_flow_options_are_refused_for_ddpm_families(tmp_path, tiny_base):
    recipe = write_recipe(tmp_path, tiny_base, draw_images(tmp_path / "images"))
    out = subprocess.run([sys.executable, "-m", "finetune", str(recipe), "train.flow.weighting=cosmap", "--check"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "train.flow.weighting applies to rectified-flow families" in out.stderr


def test_trainer_and_methods_never_name_the_unet():
    hits = [f"{p}:{i}" for folder in ("finetune/train", "finetune/methods") for p in (ROOT / folder).rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if re.search("unet", line, re.I)]
    assert hits == []


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, tiny_sd3):
    a, b = one_vs_two_processes(sd3_recipe(tmp_path, tiny_sd3, train={"max_steps": 3}), tmp_path)
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path, tiny_sd3):
    recipe = sd3_recipe(tmp_path, tiny_sd3, train={"max_steps": 16, "checkpoint_every": 2, "batch_size": 1})
    a, b = killed_and_resumed(recipe, tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
