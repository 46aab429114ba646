"""Edit and reference training, table-driven over tiny FLUX.1 Kontext, Qwen-Image-Edit, Edit-2509, Edit-2511 and
FLUX.2 [klein] bases built offline: detection (never their text-to-image siblings), a batch's loss against each
stock pipeline's own helpers, LoRA exports reloaded in the stock edit pipeline giving the trained model's images,
the ComfyUI form's key names, 2 processes = 1, and SIGKILL + resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.edit_families import (
    CASES,
    klein_prediction,
    kontext_prediction,
    qwen_edit_prediction,
    recipe,
    stock,
)
from tests.helpers import killed_and_resumed, one_vs_two_processes, run_trainer

NAMES = list(CASES)


@pytest.fixture(scope="session")
def bases(tmp_path_factory):
    from finetune.models.tiny import build_tiny

    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            case = CASES[name]
            made[name] = build_tiny(case.builder, tmp_path_factory.mktemp(name) / name, **case.build)
        return made[name]

    return get


def trainer(path: Path, *overrides: str):
    from finetune.recipe import load_recipe
    from finetune.train.setup import make_accelerator
    from finetune.train.trainer import Trainer

    r = load_recipe(path, list(overrides))
    return Trainer(r, make_accelerator(r))


@pytest.mark.parametrize("name", NAMES)
def test_detected_from_the_folder_never_as_the_text_to_image_sibling(bases, name):
    from finetune.models.detect import family_from_configs, family_of_folder
    from finetune.models.families import FAMILIES

    assert family_of_folder(bases(name)).name == CASES[name].family
    flux = {"transformer": ["diffusers", "FluxTransformer2DModel"]}
    qwen = {"transformer": ["diffusers", "QwenImageTransformer2DModel"]}
    assert family_from_configs({"_class_name": "FluxPipeline", **flux}, {}).name == "flux"
    assert family_from_configs({"_class_name": "FluxKontextPipeline", **flux}, {}).name == "flux_kontext"
    assert family_from_configs({"_class_name": "QwenImagePipeline", **qwen}, {}).name == "qwen_image"
    assert family_from_configs({"_class_name": "QwenImageEditPipeline", **qwen}, {}).name == "qwen_image_edit"
    assert not FAMILIES["qwen_image_edit_plus"].matches({"_class_name": "QwenImagePipeline", **qwen}, {}, {})


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_batch_loss_equals_the_stock_pipelines_own_computation(tmp_path, bases, name, cached):
    """Uniform timesteps on the unshifted grid (so the sigmas are the scheduler's own), the trainer's noise; text
    encoded in the step or cached (Qwen-Image-Edit: keyed on the images its encoder saw, padded per batch)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from tests.edit_families import flow_draws

    case, base = CASES[name], bases(name)
    flow = {"timestep_sampling": "uniform", "resolution_shift": False}
    t = trainer(recipe(tmp_path, base, case, train={"flow": flow}, data={"cache_text": cached}))
    batch = next(iter(t.data.loader(0)))
    assert len(batch["reference_pixels"]) == case.count
    pipe = stock(case, base)
    with torch.no_grad():
        loss, _ = t.compute_loss(batch)
        b = batch["pixel_values"].shape[0]
        sched = FlowMatchEulerDiscreteScheduler.from_config(t.comps.scheduler.config)
        drawn = {}

        def draw(latents):
            noise, u = flow_draws(t.recipe.train.seed, latents.shape[1:], b)
            drawn["noise"], sigmas = noise, sched.sigmas[(u * 1000).long()]
            s = sigmas.view(-1, 1, 1, 1)
            return (1 - s) * latents + s * noise, sigmas

        if case.family == "flux_kontext":
            latents, pred = kontext_prediction(pipe, batch, draw, 32)
        elif case.family in ("flux2_klein", "flux2_dev"):
            latents, pred = klein_prediction(pipe, batch, draw, 32)
        else:
            latents, pred = qwen_edit_prediction(pipe, batch, draw, plus=case.family.endswith("plus"))
        ref = ((pred - (drawn["noise"] - latents)) ** 2).reshape(b, -1).mean(1).mean()
    assert abs(float(loss) - float(ref)) < 1e-6, (float(loss), float(ref))


def _edit(pipe, family, image, seed: int = 0):
    """One 64 px edit through a pipeline, 2 steps, as numbers."""
    kwargs = family.edit_kwargs([image], (64, 64))
    return pipe(prompt="make it red", **kwargs, height=64, width=64, num_inference_steps=2,
                generator=torch.Generator().manual_seed(seed), output_type="np", **_guide(family, pipe)).images[0]


def _guide(family, pipe):
    return family.guidance_kwargs(pipe, None)


@pytest.fixture(scope="session")
def runs(bases, tmp_path_factory):
    """A trained LoRA per case (lr high enough that 3 steps move it), with every export form."""
    made = {}

    def get(name: str):
        if name not in made:
            case, folder = CASES[name], tmp_path_factory.mktemp(f"run_{name}")
            path = recipe(folder, bases(name), case, train={"lr": 5e-2},
                          export={"formats": ["diffusers", "kohya"]})
            made[name] = run_trainer(path, "logging.progress=false")
        return made[name]

    return get


@pytest.mark.parametrize("name", NAMES)
def test_the_diffusers_export_in_the_stock_edit_pipeline_gives_the_trained_models_images(bases, runs, name):
    from PIL import Image

    case, t = CASES[name], runs(name)
    family = t.comps.family
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    ours = _edit(t.comps.pipeline(edit=True), family, image)
    base = _edit(stock(case, bases(name)), family, image)
    pipe = stock(case, bases(name))
    pipe.load_lora_weights(Path(t.recipe.train.output_dir))
    loaded = _edit(pipe, family, image)
    assert np.abs(ours - base).max() > 1e-3  # the LoRA changed the model ...
    assert np.abs(loaded - ours).max() < 1e-4, np.abs(loaded - ours).max()  # ... and the export holds it


@pytest.mark.parametrize("name", ["flux_kontext", "qwen_image_edit_plus"])
def test_the_comfy_form_uses_the_base_familys_key_names(runs, name):
    """ComfyUI loads Kontext as a Flux model and the Qwen edits as QwenImage (comfy/lora.py maps
    'lora_transformer_<diffusers path>' for Flux through flux_to_diffusers, and 'lycoris_<path>' for QwenImage):
    the keys are the text-to-image family's, module for module."""
    from finetune.models.families import FAMILIES

    t = runs(name)
    run = Path(t.recipe.train.output_dir)
    name_of = t.recipe.export.name or run.name
    keys = load_file(run / f"{name_of}.safetensors").keys()
    sibling = {"flux_kontext": "flux", "qwen_image_edit_plus": "qwen_image"}[name]
    prefix = FAMILIES[sibling].kohya_names["transformer"].prefix
    assert keys and all(k.startswith(prefix + "_") for k in keys)
    assert FAMILIES[name].kohya_names == FAMILIES[sibling].kohya_names


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flux_kontext", "qwen_image_edit_plus", "flux2_klein"])
def test_two_processes_match_one(tmp_path, bases, name):
    two, one = one_vs_two_processes(recipe(tmp_path, bases(name), CASES[name]), tmp_path)
    assert max(float((two[k] - one[k]).abs().max()) for k in one) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flux_kontext", "qwen_image_edit_plus", "flux2_klein"])
def test_sigkill_then_resume_is_bit_identical(tmp_path, bases, name):
    path = recipe(tmp_path, bases(name), CASES[name], train={"max_steps": 8, "checkpoint_every": 4})
    resumed, ref = killed_and_resumed(path, tmp_path)
    assert resumed.keys() == ref.keys() and all(torch.equal(resumed[k], ref[k]) for k in ref)
