"""FLUX.1 on a tiny transformer built offline: text conditioning and the packed rectified-flow loss against
FluxPipeline's own helpers, target presets, every adapter and `full` reloading in a stock FluxPipeline,
[schnell] without guidance, DDP and exact resume."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.helpers import ROOT, draw_images, killed_and_resumed, one_vs_two_processes, write_recipe

CAPTIONS = ["a red circle on a white background", "blue", ""]


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    from finetune.models.tiny import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny") / "flux")


def flux_recipe(tmp_path: Path, base: Path, **sections) -> Path:
    from finetune.recipe import deep_merge

    defaults = {"model": {"max_sequence_length": 32},
                "method": {"name": "lora", "rank": 4, "alpha": 2, "targets": "attention_mlp"},
                "train": {"max_steps": 3, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 0, "seed": 5}}
    path = write_recipe(tmp_path, base, draw_images(tmp_path / "images"), **deep_merge(defaults, sections))
    if sections.get("method", {}).get("name") not in (None, "lora"):  # another method: none of LoRA's keys
        data = yaml.safe_load(path.read_text())
        data["method"] = sections["method"]
        path.write_text(yaml.safe_dump(data))
    return path


def trainer(recipe: Path, *overrides: str):
    from finetune.recipe import load_recipe
    from finetune.train.setup import make_accelerator
    from finetune.train.trainer import Trainer

    r = load_recipe(recipe, list(overrides))
    return Trainer(r, make_accelerator(r))


def test_detected_and_text_matches_the_pipeline(tiny_flux):
    from diffusers import FluxPipeline

    from finetune.models.base import resolve_base
    from finetune.models.components import LoadOptions, load_components

    comps = load_components(resolve_base(str(tiny_flux)), LoadOptions(max_sequence_length=32))
    assert comps.family.name == "flux" and comps.denoiser_name == "transformer"
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    with torch.no_grad():
        ours = comps.family.encode_prompt(comps, CAPTIONS, "cpu")
        embeds, pooled, text_ids = pipe.encode_prompt(CAPTIONS, None, device="cpu", max_sequence_length=32)
    assert torch.allclose(ours["prompt_embeds"], embeds, atol=1e-6)
    assert torch.allclose(ours["pooled_prompt_embeds"], pooled, atol=1e-6)
    assert torch.equal(text_ids, torch.zeros(32, 3))


@pytest.mark.parametrize("flow", [{}, {"timestep_sampling": "uniform", "resolution_shift": False}])
def test_packed_flow_loss_equals_the_pipeline_helpers(tmp_path, tiny_flux, flow):
    """The default (logit-normal, resolution shift) and diffusers' script's choice (uniform, unshifted),
    written out with FluxPipeline's packing, the scheduler's sigmas and diffusers' training helpers."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from tests.helpers import first_step_generators

    t = trainer(flux_recipe(tmp_path, tiny_flux, train={"flow": flow}, model={"guidance": 1.0}))
    batch = next(iter(t.data.loader(0)))
    with torch.no_grad():
        loss, _ = t.compute_loss(batch)
        latents = t.encode_latents(batch["pixel_values"])
        text = t.encode_text(batch["captions"])
        b, c, h, w = latents.shape
        sched = FlowMatchEulerDiscreteScheduler.from_config(t.comps.scheduler.config)
        noise, u = [], []
        scheme = "logit_normal" if not flow else "none"
        for g in first_step_generators(t.recipe.train.seed, 0, 0, b):
            noise.append(torch.randn(latents.shape[1:], generator=g))
            u.append(compute_density_for_timestep_sampling(scheme, 1, logit_mean=0.0, logit_std=1.0, generator=g))
        noise, u = torch.stack(noise), torch.cat(u)
        sigmas = sched.sigmas[(u * 1000).long()]  # the base config: use_dynamic_shifting, so unshifted
        if not flow:
            mu = calculate_shift((h // 2) * (w // 2), 256, 4096, 0.5, 1.15)
            sigmas = sched.time_shift(mu, 1.0, sigmas)
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
        out = t.comps.denoiser(hidden_states=packed, timestep=sigmas, guidance=torch.ones(b),
                               pooled_projections=text["pooled_prompt_embeds"],
                               encoder_hidden_states=text["prompt_embeds"], txt_ids=torch.zeros(32, 3),
                               img_ids=ids, return_dict=False)[0]
        pred = FluxPipeline._unpack_latents(out, h * 4, w * 4, 4)
        ref = ((pred - (noise - latents)) ** 2).reshape(b, -1).mean(1).mean()
    assert abs(float(loss) - float(ref)) < 1e-6, (float(loss), float(ref))


def test_presets_and_blocks_select_the_right_modules(tiny_flux):
    import peft

    from finetune.models.base import resolve_base
    from finetune.models.components import load_components
    from finetune.models.families import FAMILIES

    comps = load_components(resolve_base(str(tiny_flux)))
    from finetune.methods.lora import LoRAConfig, peft_adapter_config

    def adapted(**cfg):
        config = LoRAConfig(rank=2, **cfg)
        model = load_components(resolve_base(str(tiny_flux))).denoiser
        peft.inject_adapter_in_model(peft_adapter_config(config, 2, 2, config.denoiser_targets(FAMILIES["flux"])), model)
        return {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}

    every = adapted(targets="all_linear")
    assert "single_transformer_blocks.0.proj_out" in every and "single_transformer_blocks.0.proj_mlp" in every
    assert "proj_out" not in every and not any("norm" in n for n in every)
    attention = adapted(targets="attention")
    assert attention < every and "transformer_blocks.0.attn.add_q_proj" in attention
    single_only = adapted(targets="all_linear", blocks=["single_transformer_blocks.0"])
    assert single_only and all(n.startswith("single_transformer_blocks.0.") for n in single_only)
    assert comps.family.name == "flux"


def fixed_output(transformer, guidance: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x, ctx, pooled = torch.randn(2, 16, 64, generator=g), torch.randn(2, 8, 32, generator=g), torch.randn(2, 16, generator=g)
    from diffusers import FluxPipeline

    with torch.no_grad():
        return transformer(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled,
                           timestep=torch.tensor([0.3, 0.8]), guidance=torch.ones(2) if guidance else None,
                           txt_ids=torch.zeros(8, 3), img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu",
                                                                                                    torch.float32),
                           return_dict=False)[0]


@pytest.mark.parametrize("adapter,dora", [("lora", False), ("lora", True), ("loha", False), ("lokr", False)])
def test_every_adapter_trains_and_reloads_in_a_stock_pipeline(tmp_path, tiny_flux, adapter, dora):
    from diffusers import FluxPipeline

    from finetune.export.lora import load_peft_adapter

    t = trainer(flux_recipe(tmp_path, tiny_flux, method={"adapter": adapter, "use_dora": dora}))
    before = fixed_output(FluxPipeline.from_pretrained(tiny_flux).transformer)
    t.run()
    trained = fixed_output(t.comps.denoiser)
    assert float((trained - before).abs().max()) > 1e-4
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    if adapter == "lora":
        pipe.load_lora_weights(tmp_path / "out")
    else:
        load_peft_adapter(tmp_path / "out" / "peft_adapter.safetensors", {"transformer": pipe.transformer})
    assert float((fixed_output(pipe.transformer) - trained).abs().max()) < 1e-4


def test_full_trains_and_reloads(tmp_path, tiny_flux):
    from diffusers import FluxPipeline

    t = trainer(flux_recipe(tmp_path, tiny_flux, method={"name": "full"}, export={"formats": ["diffusers"]},
                            train={"lr": 1e-4}))
    t.run()
    trained = fixed_output(t.comps.denoiser)
    reloaded = FluxPipeline.from_pretrained(tmp_path / "out" / "model")
    assert float((fixed_output(reloaded.transformer) - trained).abs().max()) < 1e-5


def test_schnell_has_no_guidance_input_and_trains(tmp_path, tmp_path_factory):
    from finetune.models.tiny import build_tiny_flux

    base = build_tiny_flux(tmp_path_factory.mktemp("schnell") / "flux", guidance=False)
    t = trainer(flux_recipe(tmp_path, base, validation={"prompts": ["a red circle"], "seeds": [0], "steps": 2,
                                                        "width": 64, "height": 64}))
    t.run()
    assert (tmp_path / "out" / "samples" / "step-000003.png").is_file()
    assert not t.comps.denoiser.config.guidance_embeds


def test_trigger_caption_text_is_cached_and_encoders_released(tmp_path, tiny_flux):
    t = trainer(flux_recipe(tmp_path, tiny_flux))
    assert t.recipe.data.cache_text is True
    assert all(p.device.type == "cpu" for e in t.comps.text_encoders for p in e.parameters())


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, tiny_flux):
    a, b = one_vs_two_processes(flux_recipe(tmp_path, tiny_flux), tmp_path)
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path, tiny_flux):
    recipe = flux_recipe(tmp_path, tiny_flux, train={"max_steps": 16, "checkpoint_every": 2, "batch_size": 1})
    a, b = killed_and_resumed(recipe, tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)


def test_family_file_is_self_contained():
    """FLUX is one family file building its object, and one entry in the registry's list."""
    from finetune.models.families import FAMILIES
    from finetune.models.families.flux import FLUX

    text = (ROOT / "finetune" / "models" / "families" / "flux.py").read_text()
    assert re.search(r"^FLUX = FluxFamily\(", text, re.MULTILINE)
    assert FAMILIES["flux"] is FLUX


# ------------------------------------------------------------------------------------------- exports
def test_bfl_names_match_diffusers_own_converter():
    """Our diffusers -> BFL table, run backwards by diffusers' BFL -> diffusers converter (which assumes
    FLUX.1's real width, 3072), gives back every weight exactly: names, fused slices, norms, the final
    modulation's order."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from finetune.models.families.flux_bfl import bfl_state_dict, geometry_of_model

    torch.manual_seed(0)
    model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
                                   joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
                                   in_channels=16).to(torch.bfloat16)
    state = model.state_dict()
    bfl = bfl_state_dict(dict(state), geometry_of_model(dict(model.config)))
    assert any(k.startswith("double_blocks.0.img_attn.qkv") for k in bfl)
    back = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.fixture(scope="module")
def flux_run(tmp_path_factory, tiny_flux):
    """A tiny FLUX LoRA trained on every linear (incl. single blocks) and CLIP-L, written in all three forms."""
    tmp = tmp_path_factory.mktemp("fluxrun")
    t = trainer(flux_recipe(tmp, tiny_flux, method={"targets": "all_linear", "text_encoder": {"enabled": True}},
                            export={"formats": ["diffusers", "kohya", "bfl"], "name": "subject"}))
    t.run()
    return t, tmp / "out"


def test_every_bfl_and_comfy_key_lands_on_a_real_bfl_weight(flux_run):
    """Each fused BFL key names a weight of the tiny model's BFL layout with that weight's shape; each
    ComfyUI key (lora_transformer_<diffusers path>) names a module whose BFL weight slice has its shape."""
    from finetune.models.families.flux_bfl import bfl_state_dict, geometry_of_model, owner

    t, out = flux_run
    model = t.comps.denoiser
    config = geometry_of_model(dict(model.config))
    base = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    layout = bfl_state_dict(base, config)
    bfl = load_file(out / "subject_bfl.safetensors")
    stems = {k.split(".")[0] for k in bfl if k.startswith("lora_unet_")}
    assert len(stems) == 8 + 2  # one double block: 2 fused qkv + 6 plain; one single block: linear1 (fused) + linear2
    for s in stems:
        name = next(k for k in layout if k.endswith(".weight") and s == "lora_unet_" + k[:-7].replace(".", "_"))
        delta = bfl[f"{s}.lora_up.weight"].float() @ bfl[f"{s}.lora_down.weight"].float()
        assert delta.shape == layout[name].shape, s
    comfy = load_file(out / "subject.safetensors")
    owners = owner(config)
    for s in {k.split(".")[0] for k in comfy if k.startswith("lora_transformer_")}:
        module = next(m for m in owners if "lora_transformer_" + m.replace(".", "_") == s)
        bfl_name, part = owners[module]
        rows = comfy[f"{s}.lora_up.weight"].shape[0]
        assert rows == part.rows and layout[f"{bfl_name}.weight"].shape[0] >= part.offset + rows
        assert f"{s}.alpha" in comfy
    assert any(k.startswith("lora_te1_text_model_") for k in comfy)


def test_bfl_converts_back_to_the_original_exactly(tmp_path, flux_run):
    from finetune.export.convert import convert_lora

    _, out = flux_run
    back = convert_lora(out / "subject_bfl.safetensors", tmp_path / "back", "diffusers")
    a = load_file(back)
    b = load_file(out / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in b) < 1e-6
    again = convert_lora(back, tmp_path / "again.safetensors", "bfl")
    x, y = load_file(again), load_file(out / "subject_bfl.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in y)


@pytest.mark.parametrize("form", ["pytorch_lora_weights.safetensors", "subject.safetensors", "subject_bfl.safetensors"])
def test_each_form_gives_the_trained_transformer_in_a_stock_pipeline(tmp_path, tiny_flux, flux_run, form):
    """Every file, turned into diffusers form where needed, loads in FluxPipeline and reproduces the
    trained transformer (alpha != rank)."""
    from diffusers import FluxPipeline

    from finetune.export.convert import convert_lora

    t, out = flux_run
    src = out / form
    folder = src.parent if form.startswith("pytorch") else convert_lora(src, tmp_path / "d", "diffusers").parent
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    pipe.load_lora_weights(folder)
    assert float((fixed_output(pipe.transformer) - fixed_output(t.comps.denoiser)).abs().max()) < 1e-4


def test_bfl_refuses_what_it_cannot_hold(tmp_path, tiny_flux):
    recipe = flux_recipe(tmp_path, tiny_flux, method={"adapter": "loha"}, export={"formats": ["bfl"]})
    out = subprocess.run([sys.executable, "-m", "finetune", str(recipe), "--check"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "'bfl' fuses q/k/v and holds plain LoRA only" in out.stderr
    (tmp_path / "sd").mkdir()
    sd = write_recipe(tmp_path / "sd", ROOT / "finetune" / "toy" / "base", draw_images(tmp_path / "i"),
                      export={"formats": ["bfl"]})
    out = subprocess.run([sys.executable, "-m", "finetune", str(sd), "--check"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "'bfl' is not a LoRA layout of the sd1 family" in out.stderr


def test_a_hub_base_not_yet_cached_is_checked_once_it_loads(monkeypatch):
    """Offline, the shipped FLUX recipe's base is an uncached hub id: 'bfl' waits for the family, then the
    same rule applies to the family the base turned out to be."""
    from finetune.errors import RecipeError
    from finetune.models.base import Base
    from finetune.models.families import FAMILIES
    from finetune.recipe import complete_base, load_recipe

    recipe = load_recipe(ROOT / "recipes" / "flux" / "lora.yaml")
    assert "bfl" in recipe.export.formats and recipe.base.family is None
    with monkeypatch.context() as m:  # the configs, as if fetched: a FLUX base
        m.setattr(Base, "complete", lambda self: self.known_as(FAMILIES["flux"]))
        assert complete_base(recipe).family.name == "flux"
    recipe = load_recipe(ROOT / "recipes" / "flux" / "lora.yaml")
    with monkeypatch.context() as m, pytest.raises(RecipeError, match="the sd1 family"):  # flow options, bfl
        m.setattr(Base, "complete", lambda self: self.known_as(FAMILIES["sd1"]))
        complete_base(recipe)


def test_pivotal_trains_clip_and_t5_rows_and_reloads_in_a_stock_pipeline(tmp_path, tiny_flux):
    """Pivotal tuning on FLUX: the token gets new rows in CLIP-L (pooled) and T5 (sequence); the A1111/Comfy
    file holds both under clip_l / t5, and a stock FluxPipeline with it and the LoRA encodes the trigger
    prompt and denoises exactly as the trained model."""
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    from finetune.export.embeddings import load_into_pipeline
    from finetune.models.families import FAMILIES

    method = {"name": "pivotal", "embedding": {"token": "<sks>", "num_vectors": 2, "initializer": "circle",
                                               "templates": "none", "lr": 5e-2},
              "lora": {"rank": 4, "alpha": 2, "targets": "attention"}}
    t = trainer(flux_recipe(tmp_path, tiny_flux, method=method, data={"caption": {"template": "a <sks> circle"}},
                            train={"max_steps": 4}, export={"formats": ["diffusers", "a1111"], "name": "out"}))
    before = {n: e.get_input_embeddings().weight.detach().clone() for n, e in
              zip(t.comps.text_encoder_names, t.comps.text_encoders, strict=True)}
    t.run()
    ui = load_file(tmp_path / "out" / "out_emb.safetensors")
    assert set(ui) == {"clip_l", "t5"} and ui["clip_l"].shape == (2, 16) and ui["t5"].shape == (2, 32)
    for name, enc in zip(t.comps.text_encoder_names, t.comps.text_encoders, strict=True):
        ids = t.method.tokens.ids[name]
        moved = enc.get_input_embeddings().weight.detach()[ids] - before[name][ids]
        assert float(moved.abs().max()) > 1e-3, name  # both encoders' rows trained
    prompt = "a <sks> circle"
    with torch.no_grad():
        trained_text = t.comps.family.encode_prompt(t.comps, [prompt.replace("<sks>", "<sks> <sks>_1")], "cpu")
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    pipe.load_lora_weights(tmp_path / "out")
    token = load_into_pipeline(pipe, tmp_path / "out" / "out_emb.safetensors", family=FAMILIES["flux"])
    assert token == "<sks>"
    with torch.no_grad():
        # the pipeline expands '<sks>' into its vectors itself (maybe_convert_prompt), as the trainer does
        emb, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, max_sequence_length=32)
    got = {"prompt_embeds": emb, "pooled_prompt_embeds": pooled}
    for k, v in got.items():
        assert float((v - trained_text[k].to(v.dtype)).abs().max()) < 1e-5, k
    assert float((fixed_output(pipe.transformer) - fixed_output(t.comps.denoiser)).abs().max()) < 1e-4
