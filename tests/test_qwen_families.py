"""Z-Image, Qwen-Image, FLUX.2 [klein] / [dev] and Chroma, table-driven on tiny models built offline: detection, every adapter
kind and `full` reloading in the stock pipeline, cached text, the ComfyUI (kohya/LyCORIS) form with the key
names ComfyUI's loader maps and the strength it applies, conversions both ways, DDP and exact resume.
Per-family text and loss checks against each pipeline's own helpers live in tests/test_<family>.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.helpers import ROOT, killed_and_resumed, one_vs_two_processes
from tests.qwen_families import (
    CASES,
    build,
    fixed_output,
    load_lora,
    recipe,
    stock,
    text_dims,
    trainer,
)

NAMES = list(CASES)


@pytest.fixture(scope="session")
def bases(tmp_path_factory):
    made: dict[tuple, Path] = {}

    def get(name: str, **kwargs) -> Path:
        key = (name, tuple(sorted(kwargs.items())))
        if key not in made:
            made[key] = build(name, tmp_path_factory.mktemp(name) / name, **kwargs)
        return made[key]

    return get


@pytest.mark.parametrize("name", NAMES)
def test_detected_from_the_folder(bases, name):
    from finetune.models.detect import family_of_folder

    assert family_of_folder(bases(name)).name == name


def test_flux2_dev_and_flux1_are_not_klein():
    from finetune.models.detect import family_from_configs
    from finetune.models.families import FAMILIES

    index = {"transformer": ["diffusers", "Flux2Transformer2DModel"], "text_encoder": ["transformers", "x"]}
    assert family_from_configs(index, {}, {"model_type": "qwen3"}).name == "flux2_klein"
    assert not FAMILIES["flux2_klein"].matches(index, {"guidance_embeds": True}, {"model_type": "mistral3"})
    assert not FAMILIES["flux2_klein"].matches(index, {"guidance_embeds": True}, {})
    flux1 = {"transformer": ["diffusers", "FluxTransformer2DModel"]}
    assert family_from_configs(flux1, {}, {"model_type": "clip_text_model"}).name == "flux"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("adapter,dora", [("lora", False), ("lora", True), ("loha", False), ("lokr", False)])
def test_every_adapter_trains_and_reloads_in_a_stock_pipeline(tmp_path, bases, name, adapter, dora):
    from finetune.export.lora import load_peft_adapter

    case, base = CASES[name], bases(name)
    # lr 5e-2: three steps move every kind (LoHa and LoKr start slowest; on the tiny FLUX.2 [klein] they move
    # the output by ~6e-4 at 1e-2) far more than the reload tolerance
    t = trainer(recipe(tmp_path, base, case, method={"adapter": adapter, "use_dora": dora}, train={"lr": 5e-2}))
    before = fixed_output(case, stock(case, base).transformer)
    t.run()
    trained = fixed_output(case, t.comps.denoiser)
    assert float((trained - before).abs().max()) > 1e-3
    pipe = stock(case, base)
    if adapter == "lora":
        load_lora(pipe, tmp_path / "out")
    else:
        load_peft_adapter(tmp_path / "out" / "peft_adapter.safetensors", {"transformer": pipe.transformer})
    assert float((fixed_output(case, pipe.transformer) - trained).abs().max()) < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_full_trains_and_reloads(tmp_path, bases, name):
    case, base = CASES[name], bases(name)
    t = trainer(recipe(tmp_path, base, case, method={"name": "full"}, export={"formats": ["diffusers"]},
                       train={"lr": 1e-4}))
    before = fixed_output(case, t.comps.denoiser)
    t.run()
    trained = fixed_output(case, t.comps.denoiser)
    assert float((trained - before).abs().max()) > 1e-5
    reloaded = stock(case, tmp_path / "out" / "model")
    assert float((fixed_output(case, reloaded.transformer) - trained).abs().max()) < 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_text_is_cached_and_validation_renders_from_the_cache(tmp_path, bases, name):
    case = CASES[name]
    t = trainer(recipe(tmp_path, bases(name), case, validation={"prompts": ["a red circle"], "seeds": [0],
                                                                "steps": 2, "width": 64, "height": 64}))
    assert t.recipe.data.cache_text is True and set(t.prompt_cache) == {"a red circle", ""}
    batch = next(iter(t.data.loader(0)))
    assert batch["text"]["prompt_embeds"].shape == (2, case.tokens, *text_dims(case))  # fixed length: entries stack
    t.run()
    assert (tmp_path / "out" / "samples" / "step-000003.png").is_file()


@pytest.mark.parametrize("name", NAMES)
def test_text_encoder_training_is_refused_in_one_line(tmp_path, bases, name):
    path = recipe(tmp_path, bases(name), CASES[name], method={"text_encoder": {"enabled": True}})
    out = subprocess.run([sys.executable, "-m", "finetune", str(path), "--check"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"the {name} family's text encoder" in out.stderr and "Traceback" not in out.stderr


# ------------------------------------------------------------------------------------------ ComfyUI form
def comfy_names(name: str, model) -> set[str]:
    """The diffusers module names ComfyUI's loader maps for this family (read from comfy/lora.py
    `model_lora_keys_unet` and comfy/utils.py): Qwen-Image keeps diffusers names for every weight; Z-Image
    (`z_image_to_diffusers`) maps the blocks of layers / noise_refiner / context_refiner; FLUX.2 ([klein] and [dev]) and Chroma
    (whose ComfyUI model class subclasses Flux) go through `flux_to_diffusers`, which knows the double blocks'
    split q/k/v, projections and MLPs and the single blocks' fused projections."""
    weights = [k[: -len(".weight")].replace(".base_layer", "") for k in model.state_dict()
               if k.endswith(".weight") and "lora_" not in k]
    if name == "qwen_image":
        return set(weights)
    if name == "z_image":
        return {w for w in weights if re.match(r"(layers|noise_refiner|context_refiner)\.\d+\.", w)}
    if name == "lumina2":  # the same map (ComfyUI's Lumina2 model), the linears spelled as Z-Image's
        block = r"(layers|noise_refiner|context_refiner)\.\d+\."
        return {w for w in weights if re.fullmatch(block + r"(attn\.(to_[qkv]|to_out\.0)|feed_forward\.linear_[123])", w)}
    double = r"transformer_blocks\.\d+\.(attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)|ff(_context)?\.linear_(in|out))"
    single = r"single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)"
    if name == "chroma":  # FLUX.1's names (ComfyUI's Chroma is its Flux model): MLPs as net.0.proj / net.2,
        # the single blocks' q/k/v and proj_mlp (parts of linear1) and proj_out (linear2)
        double = r"transformer_blocks\.\d+\.(attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)|ff(_context)?\.net\.(0\.proj|2))"
        single = r"single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp|proj_out)"
    return {w for w in weights if re.fullmatch(f"{double}|{single}", w)}


COMFY_PREFIX = {"z_image": "lycoris_", "qwen_image": "lycoris_", "flux2_klein": "lora_transformer_",
                "chroma": "lora_transformer_", "flux2_dev": "lora_transformer_", "lumina2": "lycoris_"}


def comfy_spelling(name: str, path: str) -> str:
    """The module as comfy/utils.py `z_image_to_diffusers` spells it for ComfyUI's Lumina2 model (which Lumina 2
    and Z-Image share): Lumina 2's attn / linear_1..3 as Z-Image's attention / w1..w3; else diffusers' path."""
    if name != "lumina2":
        return path
    for ours, theirs in (("attn.", "attention."), ("linear_1", "w1"), ("linear_2", "w2"), ("linear_3", "w3")):
        path = path.replace(ours, theirs)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, bases):
    """One LoRA run per family on every block kind, written in diffusers and kohya (ComfyUI) form."""
    done = {}

    def get(name: str):
        if name not in done:
            tmp = tmp_path_factory.mktemp(f"run_{name}")
            case = CASES[name]
            method = {"targets": list(case.comfy_targets)} if case.comfy_targets else {}
            t = trainer(recipe(tmp, bases(name), case, method=method,
                               export={"formats": ["diffusers", "kohya"], "name": "subject"}))
            t.run()
            done[name] = (t, tmp / "out")
        return done[name]

    return get


@pytest.mark.parametrize("name", [n for n in NAMES if n in COMFY_PREFIX])  # ComfyUI has no Sana model
def test_every_comfy_key_names_a_weight_comfy_maps_at_the_trained_strength(runs, name):
    t, out = runs(name)
    model = t.comps.denoiser
    weights = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    mapped = {COMFY_PREFIX[name] + comfy_spelling(name, n).replace(".", "_"): n for n in comfy_names(name, model)}
    comfy = load_file(out / "subject.safetensors")
    diffusers = load_file(out / "pytorch_lora_weights.safetensors")
    stems = {k.split(".")[0] for k in comfy}
    assert len(stems) == len(diffusers) // 2  # one ComfyUI module per trained diffusers module
    for stem in stems:
        path = mapped[stem]  # KeyError: a key ComfyUI would leave unloaded ("lora key not loaded")
        up, down, alpha = (comfy[f"{stem}.{s}"] for s in ("lora_up.weight", "lora_down.weight", "alpha"))
        assert (up @ down).shape == weights[f"{path}.weight"].shape
        # ComfyUI adds up @ down * alpha / rank; peft (and diffusers) B @ A * lora_alpha / r = 2 / 4
        b, a = diffusers[f"transformer.{path}.lora_B.weight"], diffusers[f"transformer.{path}.lora_A.weight"]
        assert float(alpha) == 2.0
        assert torch.allclose(up @ down * float(alpha) / down.shape[0], b @ a * 0.5, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_conversions_both_ways_are_exact_and_load(tmp_path, runs, bases, name):
    from finetune.export.convert import convert_lora

    t, out = runs(name)
    back = load_file(convert_lora(out / "subject.safetensors", tmp_path / "d", "diffusers"))
    original = load_file(out / "pytorch_lora_weights.safetensors")
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)
    again = load_file(convert_lora(out / "pytorch_lora_weights.safetensors", tmp_path / "k.safetensors", "kohya"))
    comfy = load_file(out / "subject.safetensors")
    assert again.keys() == comfy.keys() and all(torch.equal(again[k], comfy[k]) for k in comfy)
    with safe_open(str(out / "subject.safetensors"), "pt") as f:
        assert f.metadata()["finetune.family"] == name
    case = CASES[name]
    pipe = stock(case, bases(name))
    load_lora(pipe, tmp_path / "d")
    assert float((fixed_output(case, pipe.transformer) - fixed_output(case, t.comps.denoiser)).abs().max()) < 1e-4


# --------------------------------------------------------------------------------------- processes
@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_two_processes_match_one(tmp_path, bases, name):
    a, b = one_vs_two_processes(recipe(tmp_path, bases(name), CASES[name]), tmp_path)
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_sigkill_then_resume_is_bit_identical(tmp_path, bases, name):
    path = recipe(tmp_path, bases(name), CASES[name], train={"max_steps": 16, "checkpoint_every": 2, "batch_size": 1})
    a, b = killed_and_resumed(path, tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    out = tmp_path / "killed"
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["finetune.modules"])["transformer"]["r"] == 4


@pytest.mark.parametrize("name", NAMES)
def test_the_shipped_tiny_recipe_trains_and_samples(tmp_path, bases, name):
    """recipes/<family>/lora_tiny.yaml (extending lora.yaml: its validation settings, negative prompt and
    guidance included) on the tiny base for two steps."""
    from tests.helpers import draw_images

    images = draw_images(tmp_path / "images")
    t = trainer(ROOT / "recipes" / name / "lora_tiny.yaml", f"model.base={bases(name)}",
                f"data.sources.0.path={images}", f"train.output_dir={tmp_path / 'out'}", "train.max_steps=2",
                "validation.steps=2", "train.checkpoint_every=0")
    t.run()
    assert t.comps.family.name == name and (tmp_path / "out" / "samples" / "step-000002.png").is_file()
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
