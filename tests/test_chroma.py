"""Chroma on a tiny model built offline: the text conditioning (T5 states and the keep-first-padding mask) and the
packed flow loss against ChromaPipeline's own helpers, the latents against the pipeline's normalisation, the text
mask really hiding padding, detection against FLUX.1 (folders and single files). Training, every adapter kind,
exports, DDP and resume: tests/test_qwen_families.py (table-driven, Chroma is one of its cases)."""

from __future__ import annotations

import functools

import pytest
import torch

from tests.qwen_families import CAPTIONS, CASES, build, first_step_noise_and_sigmas, recipe, trainer


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build("chroma", tmp_path_factory.mktemp("tiny") / "chroma")


def test_text_and_mask_are_the_pipelines(base):
    from diffusers import ChromaPipeline

    from finetune.models.base import resolve_base
    from finetune.models.components import LoadOptions, load_components

    comps = load_components(resolve_base(str(base)), LoadOptions(max_sequence_length=32))
    pipe = ChromaPipeline.from_pretrained(base)
    with torch.no_grad():
        ours = comps.family.encode_prompt(comps, CAPTIONS, "cpu")
        embeds, text_ids, mask, *_ = pipe.encode_prompt(CAPTIONS, None, device="cpu", max_sequence_length=32,
                                                         do_classifier_free_guidance=False)
    assert ours["prompt_embeds"].shape == embeds.shape == (3, 32, 32)
    assert float((ours["prompt_embeds"] - embeds).abs().max()) < 1e-6
    assert torch.equal(ours["prompt_attention_mask"].float(), mask.float())
    assert mask.sum(1).tolist() == [9, 3, 2]  # caption + </s> + the one padding token Chroma keeps
    assert torch.equal(text_ids, torch.zeros(32, 3))


def test_latents_are_the_pipelines_normalisation(base, monkeypatch):
    """ChromaImg2ImgPipeline._encode_vae_image (shift then scale), on the distribution's mode as we encode it."""
    from diffusers import ChromaImg2ImgPipeline, ChromaPipeline
    from diffusers.pipelines.chroma import pipeline_chroma_img2img as img2img

    from finetune.models.families import FAMILIES

    monkeypatch.setattr(img2img, "retrieve_latents", functools.partial(img2img.retrieve_latents,
                                                                       sample_mode="argmax"))
    pipe = ChromaImg2ImgPipeline(**ChromaPipeline.from_pretrained(base).components)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ours = FAMILIES["chroma"].encode_latents(pipe.vae, pixels)
        theirs = pipe._encode_vae_image(pixels, generator=None)
    assert ours.shape == (2, 16, 16, 16)
    assert float((ours - theirs).abs().max()) < 1e-6


@pytest.mark.parametrize("flow", [{}, {"timestep_sampling": "uniform", "resolution_shift": False}])
def test_packed_flow_loss_equals_the_pipelines_own_computation(tmp_path, base, flow):
    """A batch's loss written out with the pipeline's pieces: `encode_prompt`, `_pack_latents`,
    `_prepare_latent_image_ids`, `_prepare_attention_mask` (given the boolean text mask), the transformer call
    with t / 1000, `_unpack_latents`; sigmas from the scheduler's grid, shifted by `calculate_shift` for the
    token count (default) or unshifted."""
    from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler

    t = trainer(recipe(tmp_path, base, CASES["chroma"], train={"flow": flow}, data={"cache_text": False}))
    pipe = ChromaPipeline.from_pretrained(base)
    batch = next(iter(t.data.loader(0)))
    with torch.no_grad():
        loss, _ = t.compute_loss(batch)
        latents = t.encode_latents(batch["pixel_values"])
        embeds, text_ids, mask, *_ = pipe.encode_prompt(list(batch["captions"]), None, device="cpu",
                                                         max_sequence_length=32, do_classifier_free_guidance=False)
        b, c, h, w = latents.shape
        sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        noise, sigmas = first_step_noise_and_sigmas(t, latents, sched, flow, (h // 2) * (w // 2))
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        packed = pipe._pack_latents(noisy, b, c, h, w)
        ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
        full_mask = pipe._prepare_attention_mask(b, packed.shape[1], torch.float32, mask.bool())
        out = pipe.transformer(hidden_states=packed, timestep=sigmas * 1000 / 1000, encoder_hidden_states=embeds,
                               txt_ids=text_ids, img_ids=ids, attention_mask=full_mask, return_dict=False)[0]
        pred = pipe._unpack_latents(out, h * 8, w * 8, 8)
        ref = ((pred - (noise - latents)) ** 2).reshape(b, -1).mean(1).mean()
    assert abs(float(loss) - float(ref)) < 1e-6, (float(loss), float(ref))


def test_the_text_mask_hides_padding(base):
    """What lies past the first padding token never reaches the prediction: changing those text states leaves the
    output as it was (with the pipeline's float mask it would not, see the family file)."""
    from diffusers import ChromaPipeline

    from finetune.models.families import FAMILIES

    pipe = ChromaPipeline.from_pretrained(base)
    g = torch.Generator().manual_seed(0)
    latents, embeds = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 32, 32, generator=g)
    mask = (torch.arange(32) < 6).long()[None]
    changed = embeds.clone()
    changed[:, 6:] = torch.randn(1, 26, 32, generator=g)
    chroma, t = FAMILIES["chroma"], torch.tensor([500.0])
    with torch.no_grad():
        a = chroma.predict(pipe.transformer, latents, t, {"prompt_embeds": embeds, "prompt_attention_mask": mask}, {})
        b = chroma.predict(pipe.transformer, latents, t, {"prompt_embeds": changed, "prompt_attention_mask": mask}, {})
        c = chroma.predict(pipe.transformer, latents, t, {"prompt_embeds": changed,
                                                          "prompt_attention_mask": torch.ones_like(mask)}, {})
    assert torch.isfinite(a).all() and float((a - b).abs().max()) < 1e-6
    assert float((a - c).abs().max()) > 1e-4  # unmasked, the same change does reach it


def test_chroma_and_flux1_never_mistaken():
    """Folders: the denoiser class tells them apart (Chroma's published config keeps FLUX's `guidance_embeds` and
    `pooled_projection_dim` keys). Single files: both have FLUX's double_blocks; Chroma's approximator names it."""
    from finetune.models.detect import family_from_configs, family_of_keys

    chroma = {"transformer": ["diffusers", "ChromaTransformer2DModel"], "text_encoder": ["transformers", "T5EncoderModel"]}
    flux = {"transformer": ["diffusers", "FluxTransformer2DModel"], "text_encoder_2": ["transformers", "T5EncoderModel"]}
    leftovers = {"guidance_embeds": False, "pooled_projection_dim": 768}
    assert family_from_configs(chroma, leftovers, {"model_type": "t5"}).name == "chroma"
    assert family_from_configs(flux, leftovers, {"model_type": "clip_text_model"}).name == "flux"
    blocks = ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "img_in.weight"]
    assert family_of_keys(blocks + ["distilled_guidance_layer.in_proj.weight"]).name == "chroma"
    assert family_of_keys([f"model.diffusion_model.{k}" for k in blocks]
                          + ["model.diffusion_model.distilled_guidance_layer.in_proj.weight"]).name == "chroma"
    assert family_of_keys(blocks + ["guidance_in.in_layer.weight"]).name == "flux"


def test_validation_samples_with_cfg_and_the_boolean_mask(tmp_path, base):
    """Validation's pipeline gets the cached text with a boolean mask (kept boolean by `_prepare_attention_mask`),
    and the default guidance is real CFG at the pipeline's 5.0."""
    t = trainer(recipe(tmp_path, base, CASES["chroma"]))
    family = t.comps.family
    text = family.encode_prompt(t.comps, ["a red circle"], "cpu")
    kwargs = family.pipeline_prompt_kwargs(text, text)
    assert kwargs["prompt_attention_mask"].dtype == kwargs["negative_prompt_attention_mask"].dtype == torch.bool
    pipe = t.comps.pipeline()
    assert pipe._prepare_attention_mask(1, 16, torch.float32, kwargs["prompt_attention_mask"]).dtype == torch.bool
    assert family.guidance_kwargs(pipe, None) == {"guidance_scale": 5.0}
