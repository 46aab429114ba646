"""FLUX.2 [dev] on a tiny model built offline: the text conditioning (FLUX.2's system message, Mistral-3 layers
10 / 20 / 30) against Flux2Pipeline.encode_prompt, the latents against its `_encode_vae_image`, the packed flow
loss with the guidance input against the pipeline's pieces, and [dev] / [klein] never mistaken. Training, every
adapter kind, exports, DDP and resume: tests/test_qwen_families.py (table-driven, [dev] is one of its cases)."""

from __future__ import annotations

import pytest
import torch

from tests.qwen_families import CAPTIONS, CASES, build, first_step_noise_and_sigmas, recipe, trainer

TOKENS = CASES["flux2_dev"].tokens


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build("flux2_dev", tmp_path_factory.mktemp("tiny") / "flux2_dev")


def test_text_is_the_pipelines(base):
    from diffusers import Flux2Pipeline

    from finetune.models.base import resolve_base
    from finetune.models.components import LoadOptions, load_components

    comps = load_components(resolve_base(str(base)), LoadOptions(max_sequence_length=TOKENS))
    pipe = Flux2Pipeline.from_pretrained(base)
    with torch.no_grad():
        ours = comps.family.encode_prompt(comps, CAPTIONS, "cpu")
        embeds, _ = pipe.encode_prompt(list(CAPTIONS), device="cpu", max_sequence_length=TOKENS)
    assert ours["prompt_embeds"].shape == embeds.shape == (3, TOKENS, 48)
    assert float((ours["prompt_embeds"] - embeds).abs().max()) < 1e-6


def test_latents_are_the_pipelines_image_latents(base):
    from diffusers import Flux2Pipeline

    from finetune.models.families import FAMILIES

    pipe = Flux2Pipeline.from_pretrained(base)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ours = FAMILIES["flux2_dev"].encode_latents(pipe.vae, pixels)
        theirs = pipe._encode_vae_image(pixels, generator=None)
    assert ours.shape == (2, 16, 8, 8)
    assert float((ours - theirs).abs().max()) < 1e-6


@pytest.mark.parametrize("flow,guidance", [({}, None), ({"timestep_sampling": "uniform", "resolution_shift": False}, 3.5)])
def test_packed_flow_loss_equals_the_pipelines_own_computation(tmp_path, base, flow, guidance):
    """A batch's loss written out with Flux2Pipeline's pieces (`_encode_vae_image`, `encode_prompt`,
    `_prepare_latent_ids`, `_pack_latents`, the transformer call with t / 1000 and the guidance value,
    `_unpack_latents_with_ids`): by default logit-normal sigmas shifted by FLUX.1's rule at guidance 1.0;
    diffusers' script's choice (uniform, unshifted, guidance 3.5) through the recipe."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    t = trainer(recipe(tmp_path, base, CASES["flux2_dev"], train={"flow": flow}, data={"cache_text": False},
                       model={"guidance": guidance}))
    pipe = Flux2Pipeline.from_pretrained(base)
    batch = next(iter(t.data.loader(0)))
    with torch.no_grad():
        loss, _ = t.compute_loss(batch)
        latents = pipe._encode_vae_image(batch["pixel_values"], generator=None)
        embeds, text_ids = pipe.encode_prompt(list(batch["captions"]), device="cpu", max_sequence_length=TOKENS)
        b, c, h, w = latents.shape
        sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0)
        noise, sigmas = first_step_noise_and_sigmas(t, latents, sched, flow, h * w)
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        ids = pipe._prepare_latent_ids(noisy)
        tokens = pipe._pack_latents(noisy)
        out = pipe.transformer(hidden_states=tokens, timestep=sigmas * 1000 / 1000,
                               guidance=torch.full((b,), guidance or 1.0), encoder_hidden_states=embeds,
                               txt_ids=text_ids, img_ids=ids, return_dict=False)[0]
        pred = pipe._unpack_latents_with_ids(out[:, : tokens.size(1)], ids)
        ref = ((pred - (noise - latents)) ** 2).reshape(b, -1).mean(1).mean()
    assert abs(float(loss) - float(ref)) < 1e-6, (float(loss), float(ref))


def test_dev_and_klein_never_mistaken():
    """Same transformer class: the text encoder's model type tells them apart, and without its config the
    guidance input does ([dev] has one, [klein] not)."""
    from finetune.models.detect import family_from_configs
    from finetune.models.families import FAMILIES

    index = {"transformer": ["diffusers", "Flux2Transformer2DModel"], "text_encoder": ["transformers", "x"]}
    assert family_from_configs(index, {"guidance_embeds": True}, {"model_type": "mistral3"}).name == "flux2_dev"
    assert family_from_configs(index, {"guidance_embeds": False}, {"model_type": "qwen3"}).name == "flux2_klein"
    assert family_from_configs(index, {"guidance_embeds": True}, {}).name == "flux2_dev"
    assert family_from_configs(index, {"guidance_embeds": False}, {}).name == "flux2_klein"
    dev = FAMILIES["flux2_dev"]  # each asked alone, whatever the registry's order
    assert not dev.matches(index, {"guidance_embeds": False}, {"model_type": "qwen3"})
    assert not dev.matches(index, {"guidance_embeds": False}, {})
    flux1 = {"transformer": ["diffusers", "FluxTransformer2DModel"]}
    assert family_from_configs(flux1, {"guidance_embeds": True}, {"model_type": "clip_text_model"}).name == "flux"


def test_validation_passes_the_distilled_guidance_and_no_negative(tmp_path, base):
    """Flux2Pipeline has no negative prompt: validation passes the text alone and the scale (4.0, the
    pipeline's default) as the distilled guidance input; the trained model is fed model.guidance."""
    t = trainer(recipe(tmp_path, base, CASES["flux2_dev"]))
    family, pipe = t.comps.family, t.comps.pipeline()
    text = {"prompt_embeds": torch.zeros(1, TOKENS, 48)}
    assert set(family.pipeline_prompt_kwargs(text, text)) == {"prompt_embeds"}
    assert family.guidance_kwargs(pipe, None) == {"guidance_scale": 4.0}
    seen = {}

    def spy(**kwargs):
        seen.update(kwargs)
        return (torch.zeros_like(kwargs["hidden_states"]),)

    spy.config = {"guidance_embeds": True}
    family.predict(spy, torch.zeros(2, 16, 8, 8), torch.tensor([500.0, 500.0]), text, {"guidance": 2.5})
    assert seen["guidance"].tolist() == [2.5, 2.5]
