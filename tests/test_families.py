"""Model families (SD 1.x, SD 2.x v-prediction, SDXL): detection from folders and single files, SDXL's
conditioning against diffusers' pipeline, the v-prediction target, and every method's exports reloading
in the family's diffusers pipeline with the output they had in training."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from finetune.errors import ModelError
from finetune.models.base import resolve_base
from finetune.models.components import LoadOptions
from finetune.models.families import FAMILIES
from tests.helpers import db_recipe, run_trainer, write_recipe

CAPTIONS = ["a sks circle", "a blue square"]
# SDXL micro-conditioning of the two fixed examples: (h, w) original, (top, left) crop, (h, w) target
SIZES = {"original_size": [[64, 64], [96, 48]], "crop_top_left": [[0, 0], [16, 0]], "target_size": [[64, 64]] * 2}
BASES = {"sd1": "tiny_base", "sd2": "tiny_sd2_base", "sdxl": "tiny_sdxl_base"}


@pytest.fixture(params=sorted(BASES))
def family_base(request) -> tuple[str, Path]:
    return request.param, request.getfixturevalue(BASES[request.param])


def fresh_pipe(family: str, base: Path):
    import diffusers

    cls = getattr(diffusers, FAMILIES[family].pipeline_class)
    kwargs = {"safety_checker": None, "requires_safety_checker": False} if family != "sdxl" else {}
    return cls.from_pretrained(base, **kwargs)


def pipe_encoders(family: str, pipe) -> tuple[list, list]:
    f = FAMILIES[family]
    return [getattr(pipe, n) for n in f.text_encoder_names], [getattr(pipe, n) for n in f.tokenizer_names]


def family_output(family: str, unet, encoders, tokenizers) -> torch.Tensor:
    """The U-Net's prediction for fixed latents, timesteps and captions, conditioned the family's way."""
    f = FAMILIES[family]
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    batch = {k: torch.tensor(v) for k, v in SIZES.items()}
    with torch.no_grad():
        text = f.encode_prompt(SimpleNamespace(text_encoders=encoders, tokenizers=tokenizers), CAPTIONS, "cpu")
        return unet(latents, torch.tensor([500, 250]), **f.unet_kwargs(text, batch)).sample


def adapted(module) -> set[str]:
    return {n.split(".lora_A")[0] for n, _ in module.named_parameters() if ".lora_A." in n}


# ------------------------------------------------------------------------------ LoRA, every family
def test_lora_exports_reload_in_the_family_pipeline(tmp_path, images, family_base):
    """U-Net + every text encoder trained; the diffusers file and the kohya file (lora_te / lora_te1 +
    lora_te2 keys) both load through the family's pipeline.load_lora_weights and reproduce training."""
    family, base = family_base
    recipe = write_recipe(tmp_path, base, images, export={"formats": ["diffusers", "kohya"], "name": "k"},
                          method={"text_encoder": {"enabled": True, "rank": 2, "alpha": 4}})
    t = run_trainer(recipe)
    assert t.comps.family.name == family
    assert t.method.trained_modules() == ["unet", *FAMILIES[family].text_encoder_names]
    trained = family_output(family, t.comps.unet, t.comps.text_encoders, t.comps.tokenizers)
    out = Path(t.cfg.output_dir)
    for source in (out, out / "k.safetensors"):
        pipe = fresh_pipe(family, base)
        encoders, tokenizers = pipe_encoders(family, pipe)
        before = family_output(family, pipe.unet, encoders, tokenizers)
        pipe.load_lora_weights(source)
        reloaded = family_output(family, pipe.unet, encoders, tokenizers)
        assert (trained - before).abs().max() > 1e-3, "training changed nothing; the comparison would be empty"
        assert (trained - reloaded).abs().max() < 1e-4, source.name
        assert adapted(pipe.unet) == adapted(t.comps.unet)
        for mine, theirs in zip(t.comps.text_encoders, encoders, strict=True):
            assert adapted(theirs) == adapted(mine) and len(adapted(mine)) == 8  # 2 layers x q, k, v, out


def test_kohya_keys_follow_the_family(tmp_path, images, tiny_sdxl_base):
    from finetune.export.io import read_tensors

    recipe = write_recipe(tmp_path, tiny_sdxl_base, images, train={"max_steps": 1},
                          export={"formats": ["kohya"], "name": "k"}, method={"text_encoder": {"enabled": True}})
    t = run_trainer(recipe)
    tensors, meta = read_tensors(Path(t.cfg.output_dir) / "k.safetensors")
    assert {k.split("_")[1] for k in tensors} == {"unet", "te1", "te2"}
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["finetune.family"] == "sdxl"


# ------------------------------------------------------------------------------ other methods, every family
TOKEN = "<sks>"
EMBEDDING = {"token": TOKEN, "num_vectors": 2, "initializer": "circle", "lr": 5e-2}
METHODS = {
    "full": ({"name": "full", "train_text_encoder": True}, ["diffusers"]),
    "textual_inversion": ({"name": "textual_inversion", **EMBEDDING}, ["diffusers", "a1111"]),
    "pivotal": ({"name": "pivotal", "embedding": EMBEDDING, "lora": {"rank": 4, "alpha": 4}}, ["diffusers"]),
}


def pipe_latents(pipe, prompt: str = f"a {TOKEN} circle", base: Path | None = None) -> torch.Tensor:
    """A 2-step generation's latents: prompt expansion, both encoders, added conditioning, the U-Net.
    Every pipeline samples with the same sampler (the base's, as DDIM), whatever scheduler it was saved with."""
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_pretrained(base, subfolder="scheduler", clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent",
                height=64, width=64, guidance_scale=1.0).images


def reloaded_pipes(method: str, family: str, base: Path, out: Path) -> list:
    """The run's exports loaded the way a user would: a model folder, or embeddings (+ LoRA) into the base."""
    from finetune.export.embeddings import load_into_pipeline

    if method == "full":
        return [fresh_pipe(family, out / "model")]
    pipes = []
    sources = [out, out / "concept.safetensors"] if method == "textual_inversion" else [out]
    for source in sources:  # diffusers learned_embeds(_2).safetensors, and the A1111 file (clip_l/clip_g)
        pipe = fresh_pipe(family, base)
        assert load_into_pipeline(pipe, source, token=TOKEN, family=FAMILIES[family]) == TOKEN
        if method == "pivotal":
            pipe.load_lora_weights(out)
        pipes.append(pipe)
    return pipes


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_reloads_in_the_family_pipeline(tmp_path, images, family_base, method):
    import yaml

    family, base = family_base
    section, formats = METHODS[method]
    recipe = write_recipe(tmp_path, base, images, train={"max_steps": 3},
                          export={"formats": formats, "name": "concept"},
                          data={"caption": {"template": "a " + TOKEN + " circle"}})
    data = yaml.safe_load(recipe.read_text())
    data["method"] = section  # replaced, not merged into write_recipe's LoRA section
    recipe.write_text(yaml.safe_dump(data))
    t = run_trainer(recipe)
    names = FAMILIES[family].text_encoder_names
    assert set(t.method.trained_modules()) == {"unet", *names} - ({"unet"} if method == "textual_inversion" else set())
    trained = pipe_latents(t.comps.pipeline(), base=base)
    before = pipe_latents(fresh_pipe(family, base), "a circle", base)
    assert (trained - before).abs().max() > 1e-3
    if method != "full":  # the new rows moved away from their initializer ('circle'), in every encoder
        for name, rows in t.method.tokens.vectors(t.comps).items():
            i = FAMILIES[family].text_encoder_names.index(name)
            (start,) = t.comps.tokenizers[i]("circle", add_special_tokens=False).input_ids
            assert (rows - t.comps.text_encoders[i].get_input_embeddings().weight[start]).abs().max() > 1e-3
    for pipe in reloaded_pipes(method, family, base, Path(t.cfg.output_dir)):
        assert (pipe_latents(pipe, base=base) - trained).abs().max() < 1e-4


# ------------------------------------------------------------------------------ SDXL conditioning
def test_sdxl_conditioning_matches_the_diffusers_pipeline(tiny_sdxl_base):
    from finetune.models.components import load_components

    comps = load_components(resolve_base(str(tiny_sdxl_base)))
    assert comps.family.name == "sdxl" and comps.family.vae_fp16_unsafe
    text = comps.family.encode_prompt(comps, CAPTIONS, "cpu")
    pipe = comps.pipeline()
    embeds, _, pooled, _ = pipe.encode_prompt(CAPTIONS, device="cpu", do_classifier_free_guidance=False)
    assert text["prompt_embeds"].shape == (2, 77, 64) and text["pooled_prompt_embeds"].shape == (2, 32)
    assert torch.equal(text["prompt_embeds"], embeds) and torch.equal(text["pooled_prompt_embeds"], pooled)
    kwargs = comps.family.unet_kwargs(text, {k: torch.tensor(v) for k, v in SIZES.items()})
    for i in range(2):
        ids = pipe._get_add_time_ids(tuple(SIZES["original_size"][i]), tuple(SIZES["crop_top_left"][i]),
                                     tuple(SIZES["target_size"][i]), torch.float32, text_encoder_projection_dim=32)
        assert torch.equal(kwargs["added_cond_kwargs"]["time_ids"][i], ids[0])
    assert kwargs["added_cond_kwargs"]["text_embeds"] is text["pooled_prompt_embeds"]


def test_sdxl_text_and_latent_caches_hold_the_pooled_embeds(tmp_path, images, tiny_sdxl_base):
    recipe = write_recipe(tmp_path, tiny_sdxl_base, images, train={"max_steps": 2},
                          data={"cache_text": True, "cache_latents": True, "random_flip": True})
    t = run_trainer(recipe)
    render = t.data.render
    entry = render.text.get(render.text_entry("a sks circle"))
    assert set(entry) == {"prompt_embeds", "pooled_prompt_embeds"}
    assert entry["pooled_prompt_embeds"].shape == (32,)
    batch = next(iter(t.data.loader(0)))
    assert batch["text"]["pooled_prompt_embeds"].shape == (2, 32) and batch["latents"].shape[1] == 4
    fresh = t.comps.family.encode_prompt(t.comps, ["a sks circle"], "cpu")
    assert torch.allclose(entry["pooled_prompt_embeds"], fresh["pooled_prompt_embeds"][0], atol=1e-6)


def test_sdxl_vae_stays_fp32_under_mixed_precision(tiny_sdxl_base, tiny_base):
    from finetune.models.components import load_components
    from finetune.train.trainer import Trainer

    for base, vae_dtype, expected in [(tiny_sdxl_base, "auto", torch.float32), (tiny_base, "auto", torch.bfloat16),
                                      (tiny_sdxl_base, "bf16", torch.bfloat16)]:
        comps = SimpleNamespace(family=load_components(resolve_base(str(base))).family)
        fake = SimpleNamespace(recipe=SimpleNamespace(model=SimpleNamespace(vae_dtype=vae_dtype)), dtype=torch.bfloat16)
        assert Trainer._vae_dtype(fake, comps.family) == expected  # (quant19: it takes the family)


def test_generation_decodes_in_the_vae_dtype_under_autocast(tiny_sdxl_base):
    from finetune.models.components import load_components

    comps = load_components(resolve_base(str(tiny_sdxl_base)))
    comps.unet.to(torch.bfloat16)  # the trainer's frozen U-Net under mixed precision; the VAE stays fp32
    pipe = comps.pipeline()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        image = pipe.vae.decode(torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)).sample
        latents = pipe("a circle", num_inference_steps=2, height=64, width=64, output_type="pt").images
    assert image.dtype == torch.float32  # autocast alone would have decoded in bf16
    assert torch.isfinite(latents).all() and latents.std() > 0


def test_non_finite_latents_name_the_fix(tiny_sdxl_base):
    from diffusers import AutoencoderKL

    from finetune.train.trainer import NonFiniteError, Trainer

    vae = AutoencoderKL.from_pretrained(tiny_sdxl_base / "vae")
    with torch.no_grad():
        vae.encoder.conv_in.weight.fill_(1e38)  # overflows, as the SDXL VAE does in fp16
    from finetune.models.families.sdxl import SDXL

    fake = SimpleNamespace(comps=SimpleNamespace(vae=vae, family=SDXL))  # the family normalises the latents
    with pytest.raises(NonFiniteError, match="model.vae_dtype: fp32"):
        Trainer.encode_latents(fake, torch.ones(1, 3, 32, 32))


def test_sdxl_dreambooth_lora_in_bf16_with_an_fp32_vae(tmp_path, images, tiny_sdxl_base):
    """Prior preservation generates SDXL class images; under bf16 mixed precision the VAE stays fp32 next to
    the bf16 U-Net, and the validation grid and class images decode to finite, non-black images."""
    import numpy as np
    from PIL import Image


    recipe = db_recipe(tmp_path, tiny_sdxl_base, images, num=2, method={"name": "lora", "rank": 4},
                       train={"max_steps": 2, "mixed_precision": "bf16"},
                       validation={"prompts": ["a sks circle"], "seeds": [0], "steps": 2, "at_start": False})
    t = run_trainer(recipe)
    assert t.comps.vae.dtype == torch.float32 and t.comps.unet.conv_in.weight.dtype == torch.bfloat16
    class_images = sorted((tmp_path / "class").glob("class-*.png"))
    assert len(class_images) == 2
    grid = Path(t.cfg.output_dir) / "samples" / "step-000002.png"
    for path in [*class_images, grid]:
        with Image.open(path) as im:
            sample = im.crop((0, im.height - 64, 64, im.height)) if path == grid else im  # the grid's one image
            assert np.asarray(sample.convert("L")).std() > 1, path  # not a flat (NaN -> black) image
    assert bool(next(iter(t.data.loader(0)))["is_prior"].any())


# ------------------------------------------------------------------------------ v-prediction
@pytest.mark.parametrize("base, override, expected", [
    ("tiny_sd2_base", "auto", "v_prediction"),
    ("tiny_sd2_base", "epsilon", "epsilon"),
    ("tiny_base", "auto", "epsilon"),
])
def test_training_target_follows_the_base(tmp_path, images, monkeypatch, request, base, override, expected):
    import finetune.train.objectives as trainer  # where the DDPM objective looks it up

    seen = []
    real = trainer.target_for

    def spy(scheduler, latents, noise, timesteps):
        target = real(scheduler, latents, noise, timesteps)
        seen.append((scheduler.config.prediction_type, latents, noise, timesteps, target))
        return target

    monkeypatch.setattr(trainer, "target_for", spy)
    recipe = write_recipe(tmp_path, request.getfixturevalue(base), images, train={"max_steps": 1},
                          model={"prediction_type": override})
    t = run_trainer(recipe)
    assert t.comps.prediction_type == expected and [s[0] for s in seen] == [expected]
    _, latents, noise, timesteps, target = seen[0]
    a = t.comps.scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    velocity = a.sqrt() * noise - (1 - a).sqrt() * latents
    want = velocity if expected == "v_prediction" else noise
    assert torch.allclose(target, want, atol=1e-5)
    assert (velocity - noise).abs().max() > 0.1  # the two targets differ, so the check can fail


# ------------------------------------------------------------------------------ detection
def real_configs() -> dict[str, tuple[dict, dict, dict]]:
    """(model_index, unet config, text_encoder config) of SD 1.5, SD 2.1 and SDXL base, from the public configs."""
    from transformers import CLIPTextConfig

    from finetune.models import reference as ref

    def te(cfg: dict) -> dict:
        return CLIPTextConfig(**cfg).to_dict()

    sd_index = {"_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"],
                "unet": ["diffusers", "UNet2DConditionModel"], "safety_checker": [None, None]}
    xl_index = {"_class_name": "StableDiffusionXLPipeline", "text_encoder": ["transformers", "CLIPTextModel"],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "unet": ["diffusers", "UNet2DConditionModel"]}
    return {"sd1": (sd_index, ref.SD15_UNET, te(ref.CLIP_L)), "sd2": (sd_index, ref.SD21_UNET, te(ref.OPENCLIP_H)),
            "sdxl": (xl_index, ref.SDXL_UNET, te(ref.CLIP_L))}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_detects_real_diffusers_folders(tmp_path, family):
    from finetune.models.detect import family_of_folder

    index, unet, te = real_configs()[family]
    for name, cfg in (("model_index.json", index), ("unet/config.json", unet), ("text_encoder/config.json", te)):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(json.dumps(cfg))
    assert family_of_folder(tmp_path).name == family


def test_detects_an_sdxl_refiner_and_refuses_it():
    from finetune.models.detect import family_from_configs

    index, unet, _ = real_configs()["sdxl"]
    with pytest.raises(NotImplementedError, match="refiner"):
        family_from_configs(index | {"text_encoder": [None, None]}, unet)


def test_tiny_bases_are_detected_when_loaded(family_base):
    from finetune.models.components import load_components

    family, base = family_base
    comps = load_components(resolve_base(str(base)))
    assert comps.family.name == family
    assert comps.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    assert [type(e).__name__ for e in comps.text_encoders] == (
        ["CLIPTextModel", "CLIPTextModelWithProjection"] if family == "sdxl" else ["CLIPTextModel"])


# characteristic keys of original-layout single files (kohya/A1111/ComfyUI checkpoints)
SINGLE_FILE_KEYS = {
    "sd1": ["cond_stage_model.transformer.text_model.embeddings.position_ids",
            "model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.decoder.conv_in.weight"],
    "sd2": ["cond_stage_model.model.positional_embedding", "cond_stage_model.model.text_projection",
            "model.diffusion_model.input_blocks.0.0.weight"],
    "sdxl": ["conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
             "conditioner.embedders.1.model.positional_embedding", "conditioner.embedders.1.model.text_projection",
             "model.diffusion_model.label_emb.0.0.weight"],
}


def write_keys(path: Path, keys: list[str]) -> Path:
    from safetensors.torch import save_file

    save_file({k: torch.zeros(1) for k in keys}, path)
    return path


@pytest.mark.parametrize("family", sorted(SINGLE_FILE_KEYS))
def test_detects_single_file_checkpoints(tmp_path, family):
    from finetune.models.detect import family_of_checkpoint

    path = write_keys(tmp_path / "model.safetensors", SINGLE_FILE_KEYS[family])
    assert family_of_checkpoint(path).name == family


def test_single_file_errors_say_what_to_do(tmp_path):
    from finetune.models.components import load_components
    from finetune.models.detect import family_of_checkpoint

    refiner = write_keys(tmp_path / "refiner.safetensors", ["conditioner.embedders.0.model.positional_embedding"])
    with pytest.raises(ModelError, match="SDXL refiner"):
        family_of_checkpoint(refiner)
    other = write_keys(tmp_path / "other.safetensors", ["transformer.blocks.0.weight"])
    with pytest.raises(ModelError, match="set model.family"):
        family_of_checkpoint(other)
    # an SDXL single file needs its diffusers configs, which offline only model.config can give
    sdxl = write_keys(tmp_path / "sdxl.safetensors", SINGLE_FILE_KEYS["sdxl"])
    with pytest.raises(ModelError, match=r"single-file sdxl checkpoint .*set model.config"):
        load_components(resolve_base(str(sdxl)))
    (tmp_path / "old.ckpt").write_bytes(b"not read")
    with pytest.raises(ModelError, match="allow_pickle"):
        load_components(resolve_base(str(tmp_path / "old.ckpt")))


def test_replacement_vae(tiny_base, tiny_sdxl_base):
    from finetune.models.components import load_components

    comps = load_components(resolve_base(str(tiny_base)), LoadOptions(vae=str(tiny_sdxl_base / "vae")))
    assert comps.vae.config.scaling_factor == 0.13025 and comps.family.name == "sd1"
    with pytest.raises(ModelError, match="model.vae 'nobody/no-vae' is not in the local Hugging Face cache"):
        load_components(resolve_base(str(tiny_base)), LoadOptions(vae="nobody/no-vae"))


# ------------------------------------------------------------------------------ reference SDXL
def test_reference_sdxl_has_the_public_shapes():
    from finetune.models.reference import sdxl_modules

    modules = sdxl_modules("meta")  # shapes only: no memory, no time
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}
    assert counts == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                      "text_encoder_2": 694_659_840}
    assert modules["unet"].add_embedding.linear_1.in_features == 2816
    assert modules["vae"].config.force_upcast and modules["vae"].config.scaling_factor == 0.13025
