"""Krea 2 on a tiny model built offline: the text conditioning (Qwen-Image's template as one fixed block, stacked
Qwen3-VL states, boolean mask) and the packed flow loss against Krea2Pipeline's own pieces, the latents against
the pipeline's normalisation, the boolean mask really hiding padding, detection against Qwen-Image. Training,
every adapter kind, exports, DDP and resume: tests/test_qwen_families.py (table-driven, Krea 2 is one of its
cases)."""

from __future__ import annotations

import pytest
import torch

from tests.qwen_families import CAPTIONS, CASES, build, first_step_noise_and_sigmas, recipe, trainer


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build("krea2", tmp_path_factory.mktemp("tiny") / "krea2")


def test_text_and_mask_are_the_pipelines(base):
    """The layers the base's pipeline config names (1 and 3 here), stacked per token, the 34 prefix tokens gone."""
    from diffusers import Krea2Pipeline

    from finetune.models.base import resolve_base
    from finetune.models.components import LoadOptions, load_components

    comps = load_components(resolve_base(str(base)), LoadOptions(max_sequence_length=32))
    pipe = Krea2Pipeline.from_pretrained(base)
    with torch.no_grad():
        ours = comps.family.encode_prompt(comps, CAPTIONS, "cpu")
        embeds, mask = pipe.encode_prompt(CAPTIONS, device="cpu", max_sequence_length=32)
    assert ours["prompt_embeds"].shape == embeds.shape == (3, 32, 2, 16)
    assert float((ours["prompt_embeds"] - embeds).abs().max()) < 1e-6
    assert torch.equal(ours["prompt_embeds_mask"], mask) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [13, 8, 5]  # the caption, then the 5 suffix tokens after the padding
    assert comps.extras["pipeline_config"]["text_encoder_select_layers"] == (1, 3)


def test_latents_are_what_the_pipeline_decodes(base):
    """Krea2Pipeline decodes `latents * latents_std + latents_mean` per channel (Qwen-Image's VAE)."""
    from diffusers import Krea2Pipeline

    from finetune.models.families import FAMILIES

    vae = Krea2Pipeline.from_pretrained(base).vae
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ours = FAMILIES["krea2"].encode_latents(vae, pixels)
        mode = vae.encode(pixels.unsqueeze(2)).latent_dist.mode().squeeze(2)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
    assert ours.shape == (2, 16, 16, 16)
    assert float((ours * std + mean - mode).abs().max()) < 1e-5
    assert float((ours - mode).abs().max()) > 1e-2


@pytest.mark.parametrize("flow", [{}, {"timestep_sampling": "uniform", "resolution_shift": False}])
def test_packed_flow_loss_equals_the_pipelines_own_computation(tmp_path, base, flow):
    """A batch's loss written out with the pipeline's pieces: `encode_prompt`, `_pack_latents`,
    `prepare_position_ids`, the transformer at t / 1000 with the boolean mask, `_unpack_latents`; sigmas shifted
    by `calculate_shift` over the scheduler's config (max 6400 tokens), or uniform unshifted."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Krea2Pipeline

    t = trainer(recipe(tmp_path, base, CASES["krea2"], train={"flow": flow}, data={"cache_text": False}))
    pipe = Krea2Pipeline.from_pretrained(base)
    batch = next(iter(t.data.loader(0)))
    with torch.no_grad():
        loss, _ = t.compute_loss(batch)
        latents = t.encode_latents(batch["pixel_values"])
        embeds, mask = pipe.encode_prompt(list(batch["captions"]), device="cpu", max_sequence_length=32)
        b, c, h, w = latents.shape
        sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        noise, sigmas = first_step_noise_and_sigmas(t, latents, sched, flow, (h // 2) * (w // 2))
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        packed = pipe._pack_latents(noisy, b, c, h, w)
        ids = pipe.prepare_position_ids(embeds.shape[1], h // 2, w // 2, "cpu")
        out = pipe.transformer(hidden_states=packed, encoder_hidden_states=embeds, timestep=sigmas * 1000 / 1000,
                               position_ids=ids, encoder_attention_mask=mask, return_dict=False)[0]
        pred = pipe._unpack_latents(out, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor).squeeze(2)
        ref = ((pred - (noise - latents)) ** 2).reshape(b, -1).mean(1).mean()
    assert abs(float(loss) - float(ref)) < 1e-6, (float(loss), float(ref))


def test_the_boolean_mask_hides_padding(base):
    """Text states past the mask never reach the prediction; a float mask would be an additive bias in SDPA and
    hide nothing, so `predict` keeps it boolean whatever the cache stored."""
    from diffusers import Krea2Pipeline

    from finetune.models.families import FAMILIES

    pipe = Krea2Pipeline.from_pretrained(base)
    g = torch.Generator().manual_seed(0)
    latents, embeds = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 2, 16, generator=g)
    mask = (torch.arange(16) < 6).float()[None]  # as a cache might hold it
    changed = embeds.clone()
    changed[:, 6:] = torch.randn(1, 10, 2, 16, generator=g)
    krea, t = FAMILIES["krea2"], torch.tensor([500.0])
    with torch.no_grad():
        a = krea.predict(pipe.transformer, latents, t, {"prompt_embeds": embeds, "prompt_embeds_mask": mask}, {})
        b = krea.predict(pipe.transformer, latents, t, {"prompt_embeds": changed, "prompt_embeds_mask": mask}, {})
        c = krea.predict(pipe.transformer, latents, t, {"prompt_embeds": changed,
                                                        "prompt_embeds_mask": torch.ones_like(mask)}, {})
    assert torch.isfinite(a).all() and float((a - b).abs().max()) < 1e-6
    assert float((a - c).abs().max()) > 1e-4


def test_krea2_and_qwen_image_never_mistaken():
    """Both read Qwen-Image's template and VAE; the denoiser class tells them apart."""
    from finetune.models.detect import family_from_configs

    krea = {"transformer": ["diffusers", "Krea2Transformer2DModel"], "vae": ["diffusers", "AutoencoderKLQwenImage"]}
    qwen = {"transformer": ["diffusers", "QwenImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKLQwenImage"]}
    assert family_from_configs(krea, {}, {"model_type": "qwen3_vl"}).name == "krea2"
    assert family_from_configs(qwen, {}, {"model_type": "qwen2_5_vl"}).name == "qwen_image"


def test_validation_keeps_the_pipeline_settings_and_samples_with_cfg(tmp_path, base):
    t = trainer(recipe(tmp_path, base, CASES["krea2"]))
    family = t.comps.family
    text = family.encode_prompt(t.comps, ["a red circle"], "cpu")
    kwargs = family.pipeline_prompt_kwargs(text, text)
    assert kwargs["prompt_embeds_mask"].dtype == kwargs["negative_prompt_embeds_mask"].dtype == torch.bool
    pipe = t.comps.pipeline()
    assert pipe.config.text_encoder_select_layers == (1, 3) and not pipe.config.is_distilled
    assert family.guidance_kwargs(pipe, None) == {"guidance_scale": 4.5}
