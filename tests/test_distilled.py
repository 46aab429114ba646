"""Distilled and turbo bases: what a base is (distilled or not, its sampling defaults) from its family, configs,
name or toy record; the warning for a LoRA trained directly on a step-distilled base; validation.base (grids from
the distilled model with the LoRA at its own steps and guidance, layers checked) and export.target_base (card and
metadata) on tiny FLUX models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.helpers import ROOT, draw_images, write_recipe

FLUX_LORA = {"model": {"max_sequence_length": 16}, "method": {"rank": 4, "alpha": 4, "targets": "attention_mlp"}}


# ------------------------------------------------------------------------------------- what a base is
@pytest.mark.parametrize(("ref", "name", "steps", "guidance", "distilled"), [
    ("flux1-schnell", "FLUX.1-schnell", 4, 0.0, ("guidance", "steps")),  # scheduler: static shift 1
    ("flux1-dev", "FLUX.1-dev", 28, 3.5, ("guidance",)),  # transformer: guidance_embeds
    ("flux2-klein-4b", "FLUX.2-klein-4B", 4, 1.0, ("guidance", "steps")),  # model_index: is_distilled
    ("z-image-turbo", "Z-Image-Turbo", 9, 0.0, ("guidance", "steps")),  # the name: same configs as the base
    ("z-image-turbo", "Z-Image", 50, 4.0, ()),
    ("sd35-large", "stable-diffusion-3.5-large", 28, 7.0, ()),
])
def test_published_configs_say_what_a_base_is(tmp_path, ref, name, steps, guidance, distilled):
    from finetune.models.base import resolve_base
    from finetune.models.reference import reference_folder

    folder = shutil.copytree(reference_folder(ref), tmp_path / name)
    s = resolve_base(str(folder)).sampling
    assert (s.steps, s.guidance, s.distilled) == (steps, guidance, distilled), s
    assert s.step_distilled == ("steps" in distilled)


def test_klein_base_is_not_distilled(tmp_path):
    from finetune.models.base import resolve_base
    from finetune.models.reference import reference_folder

    folder = shutil.copytree(reference_folder("flux2-klein-4b"), tmp_path / "FLUX.2-klein-base-4B")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"is_distilled": False}))
    s = resolve_base(str(folder)).sampling
    assert (s.steps, s.guidance, s.distilled) == (50, 4.0, ())


def test_toys_say_it_in_their_record():
    from finetune.models.base import resolve_base

    base, turbo = resolve_base("toy-flux").sampling, resolve_base("toy-flux-turbo").sampling
    assert (base.steps, base.guidance, base.distilled) == (28, 5.0, ())
    assert (turbo.steps, turbo.guidance, turbo.step_distilled) == (4, 1.0, True)
    assert "distilled from toy-flux" in turbo.describe()


# ----------------------------------------------------------------------------------------- the warning
@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return draw_images(tmp_path_factory.mktemp("images"), n=4)


def warnings_of(tmp_path, base: str, images, **sections) -> list[str]:
    from finetune.recipe import load_recipe
    from finetune.routes import recipe_warnings

    return recipe_warnings(load_recipe(write_recipe(tmp_path, base, images, **sections)))


def test_warning_on_a_step_distilled_base_only(tmp_path, images):
    lora = {"method": {"targets": "attention"}}
    (line,) = warnings_of(tmp_path, "toy-flux-turbo", images, **lora)
    assert "model.base 'toy-flux-turbo' is step-distilled" in line
    assert "validation.base: toy-flux-turbo" in line and "model.training_adapter" in line and "\n" not in line
    assert warnings_of(tmp_path, "toy-flux", images, **lora) == []  # undistilled
    assert warnings_of(tmp_path, "toy-flux", images, validation={"base": "toy-flux-turbo"}, **lora) == []  # route 1
    assert warnings_of(tmp_path, "toy-flux-turbo", images, model={"training_adapter": "toy-flux-turbo-adapter"},
                       **lora) == []  # route 2
    ti = {"name": "textual_inversion", "token": "<sks>", "initializer": "circle"}
    path = write_recipe(tmp_path, "toy-flux-turbo", images)
    data = json.loads(json.dumps(__import__("yaml").safe_load(path.read_text())))
    data["method"] = ti
    path.write_text(__import__("yaml").safe_dump(data))
    from finetune.recipe import load_recipe
    from finetune.routes import recipe_warnings

    assert recipe_warnings(load_recipe(path)) == []  # new token rows only: the denoiser is not trained


def test_check_prints_the_warning(tmp_path, images):
    recipe = write_recipe(tmp_path, "toy-flux-turbo", images, method={"targets": "attention"})
    out = subprocess.run([sys.executable, "-m", "finetune", str(recipe), "--check"], capture_output=True, text=True,
                         cwd=ROOT, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1 and "step-distilled" in lines[0]


# ------------------------------------------------------------------------------------ recipe rules
def test_route_rules_name_the_key(tmp_path, images):
    from finetune.errors import RecipeError
    from finetune.recipe import load_recipe

    def fails(match, **sections):
        with pytest.raises(RecipeError, match=match):
            load_recipe(write_recipe(tmp_path, "toy-flux", images, **sections))

    fails(r"validation.base 'toy' is a sd1 base and model.base a flux one", validation={"base": "toy"},
          method={"targets": "attention"})
    fails(r"validation.training_adapter: both shows grids with model.training_adapter, which is not set",
          validation={"training_adapter": "both"}, method={"targets": "attention"})
    fails(r"model.training_adapter.*no such file or folder", model={"training_adapter": "./nothing.safetensors"},
          method={"targets": "attention"})
    path = write_recipe(tmp_path, "toy-flux", images, validation={"base": "toy-flux-turbo"})
    data = __import__("yaml").safe_load(path.read_text())
    data["method"] = {"name": "full"}
    path.write_text(__import__("yaml").safe_dump(data))
    with pytest.raises(RecipeError, match="validation.base .*method 'full' trains the denoiser's own weights"):
        load_recipe(path)


# ------------------------------------------------------------------------------ route 1 on tiny FLUX models
@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    """An undistilled tiny FLUX (no guidance input, resolution shift) and a [schnell]-shaped one of the same
    architecture with other weights (static shift 1): where a run trains, and the distilled model it is for."""
    from finetune.models.tiny import build_tiny_flux

    root = tmp_path_factory.mktemp("pair")
    base = build_tiny_flux(root / "tiny-flux-base", seed=0, guidance=False)
    other = build_tiny_flux(root / "other", seed=1, guidance=False)
    target = shutil.copytree(base, root / "tiny-flux-schnell")  # the same encoders and VAE, as in the real pairs
    shutil.rmtree(target / "transformer")
    shutil.copytree(other / "transformer", target / "transformer")
    sched = target / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps(json.loads(sched.read_text()) | {"use_dynamic_shifting": False, "shift": 1.0}))
    return base, target


PROMPTS = ["a sks circle", "a red square"]


def test_validation_base_renders_the_lora_on_the_distilled_model_at_its_defaults(tmp_path, tiny_pair, images,
                                                                                  monkeypatch):
    import numpy as np
    from diffusers import FluxPipeline

    import finetune.train.validation as validation
    from tests.helpers import run_trainer

    base, target = tiny_pair
    calls = []
    real = validation.render

    def spy(pipe, prompts, seeds, cfg, *args, **kwargs):
        rows = real(pipe, prompts, seeds, cfg, *args, **kwargs)
        calls.append({"steps": cfg.steps, "guidance": cfg.guidance_scale, "transformer": pipe.transformer,
                      "shift": pipe.scheduler.config.use_dynamic_shifting, "rows": rows})
        return rows

    monkeypatch.setattr(validation, "render", spy)
    recipe = write_recipe(tmp_path, base, images, **FLUX_LORA,
                          validation={"prompts": PROMPTS, "seeds": [0, 1], "at_start": True, "base": str(target)},
                          export={"formats": ["diffusers", "kohya"], "model_card": True},
                          train={"max_steps": 2, "lr": 1e-2})
    t = run_trainer(recipe)
    assert t.target is not None and t.target.denoiser is not t.comps.denoiser
    assert len(calls) == 2  # step 0 and the end
    for call in calls:  # [schnell]'s defaults: 4 steps, guidance 0, its static shift, its transformer
        assert (call["steps"], call["guidance"], call["shift"]) == (4, 0.0, False)
        assert call["transformer"] is t.target.denoiser
    # the last grid is what a stock FluxPipeline of the target draws with the exported LoRA, at 4 steps
    pipe = FluxPipeline.from_pretrained(target)
    pipe.load_lora_weights(t.out)
    pipe.set_progress_bar_config(disable=True)
    for prompt, row in zip(PROMPTS, calls[-1]["rows"], strict=True):
        import torch

        gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
        stock = pipe([prompt] * 2, num_inference_steps=4, guidance_scale=0.0, generator=gens, height=64, width=64,
                     max_sequence_length=16).images
        diff = max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max() for a, b in zip(row, stock, strict=True))
        assert diff <= 2.0, (prompt, diff)
    # the card and every file say which base the LoRA is for, and how to sample it
    card = (t.out / "README.md").read_text()
    assert f"for `<local>/{target.name}`" in card and f"on `<local>/{base.name}`" in card
    assert "num_inference_steps=4, guidance_scale=0" in card and "FLUX.1 [schnell]" in card
    for name in ("pytorch_lora_weights.safetensors", f"{t.out.name}.safetensors"):
        with safe_open(t.out / name, "pt") as f:
            meta = f.metadata()
        assert meta["finetune.target_base"] == f"<local>/{target.name}"
        assert meta["finetune.base_model"] == f"<local>/{base.name}"
        assert json.loads(meta["finetune.sampling"])["steps"] == 4
        assert meta["modelspec.usage_hint"].endswith("4 steps, guidance 0")


def test_validation_base_of_another_shape_is_refused(tmp_path, tiny_pair, images):
    from finetune.errors import ModelError
    from finetune.models.tiny import build_tiny_flux
    from tests.helpers import run_trainer

    base, _ = tiny_pair
    other = build_tiny_flux(tmp_path / "wide", seed=1, guidance=False)
    cfg = other / "transformer" / "config.json"
    cfg.write_text(json.dumps(json.loads(cfg.read_text()) | {"attention_head_dim": 8, "axes_dims_rope": [2, 3, 3]}))
    from diffusers import FluxTransformer2DModel

    FluxTransformer2DModel.from_config(json.loads(cfg.read_text())).save_pretrained(other / "transformer")
    recipe = write_recipe(tmp_path, base, images, **FLUX_LORA, validation={"base": str(other)},
                          train={"max_steps": 1})
    with pytest.raises(ModelError, match=r"validation.base '.*wide': layer 'transformer_blocks.0.attn.to_q' is "
                                         r"\(16, 16\) there and \(32, 32\) in model.base"):
        run_trainer(recipe)


def test_a_run_on_a_distilled_base_samples_at_its_defaults_and_warns(tmp_path, tiny_pair, images, monkeypatch,
                                                                     capsys):
    """No validation.base: model.base's own defaults ([schnell]-shaped: 4 steps, guidance 0) unless the recipe
    sets them; the run's start prints the warning (main process, stderr)."""
    import finetune.train.validation as validation
    from tests.helpers import run_trainer

    _, schnell = tiny_pair
    seen = []
    real = validation.render

    def spy(pipe, prompts, seeds, cfg, *args, **kwargs):
        seen.append((cfg.steps, cfg.guidance_scale))
        return real(pipe, prompts, seeds, cfg, *args, **kwargs)

    monkeypatch.setattr(validation, "render", spy)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    run_trainer(write_recipe(tmp_path / "a", schnell, images, **FLUX_LORA, train={"max_steps": 1},
                             validation={"prompts": PROMPTS[:1], "seeds": [0], "at_start": False}))
    assert seen == [(4, 0.0)]
    assert "warning: model.base" in capsys.readouterr().err
    run_trainer(write_recipe(tmp_path / "b", schnell, images, **FLUX_LORA, train={"max_steps": 1},
                             validation={"prompts": PROMPTS[:1], "seeds": [0], "at_start": False, "steps": 2,
                                         "guidance_scale": 1.0}))
    assert seen[-1] == (2, 1.0)  # the recipe's own values win


def test_validation_base_without_a_trained_layer_is_refused(tmp_path, tiny_pair, images):
    """The key check: model.base has a second double-stream block, the target one; the run stops before a step."""
    from diffusers import FluxTransformer2DModel

    from finetune.errors import ModelError
    from tests.helpers import run_trainer

    base, target = tiny_pair
    deep = shutil.copytree(base, tmp_path / "deep")
    config = json.loads((deep / "transformer" / "config.json").read_text())
    FluxTransformer2DModel.from_config(config | {"num_layers": 2}).save_pretrained(deep / "transformer")
    recipe = write_recipe(tmp_path, deep, images, **FLUX_LORA, validation={"base": str(target)},
                          train={"max_steps": 1})
    with pytest.raises(ModelError, match=r"validation.base '.*tiny-flux-schnell' has no layer "
                                         r"'transformer_blocks.1.attn.to_q', which the method adapts in model.base"):
        run_trainer(recipe)
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()


def test_a_quantized_run_samples_on_its_quantized_target(tmp_path, tiny_pair, images, monkeypatch):
    """model.quantize: nf4 quantizes the target as it does model.base. bitsandbytes packs a 4-bit weight when it
    moves to a device (CUDA on a real run), so the training side may be packed when the target is checked: the
    layer check reads each layer's shape as built. Here the move is made on the CPU, as a GPU run makes it."""
    import finetune.train.target as target_mod
    from tests.helpers import run_trainer

    packed = []
    check = target_mod.Target.check_layers

    def on_a_device(self, trained):
        trained.to("cpu")  # bitsandbytes quantizes on this move, as on the move to CUDA
        packed.extend(m.weight.bnb_quantized for m in trained.modules() if type(m).__name__ == "Linear4bit")
        return check(self, trained)

    monkeypatch.setattr(target_mod.Target, "check_layers", on_a_device)
    base, target = tiny_pair
    recipe = write_recipe(tmp_path, base, images, **{**FLUX_LORA, "model": {**FLUX_LORA["model"], "quantize": "nf4"}},
                          validation={"prompts": PROMPTS[:1], "seeds": [0], "at_start": False, "base": str(target)},
                          train={"max_steps": 1})
    t = run_trainer(recipe)
    assert packed and all(packed)
    assert any(type(m).__name__ == "Linear4bit" for m in t.target.denoiser.modules()) and t.target.resident
    assert (t.out / "samples" / "step-000001.png").exists()
