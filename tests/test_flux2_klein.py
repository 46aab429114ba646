"""FLUX.2 [klein] on a tiny model built offline: the text conditioning and the packed flow loss against
Flux2KleinPipeline's own prompt encoding (Qwen3 layers 9 / 18 / 27), VAE encoding (patchify + batch-norm
statistics), packing, position ids and transformer call; [klein] Base vs distilled in validation.
Training, exports, DDP and resume: tests/test_qwen_families.py."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import first_step_generators
from tests.qwen_families import CAPTIONS, CASES, build, recipe, trainer


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build("flux2_klein", tmp_path_factory.mktemp("tiny") / "flux2_klein")


def test_text_is_the_pipelines(base):
    from diffusers import Flux2KleinPipeline

    from finetune.models.base import resolve_base
    from finetune.models.components import LoadOptions, load_components

    comps = load_components(resolve_base(str(base)), LoadOptions(max_sequence_length=32))
    pipe = Flux2KleinPipeline.from_pretrained(base)
    with torch.no_grad():
        ours = comps.family.encode_prompt(comps, CAPTIONS, "cpu")
        embeds, _ = pipe.encode_prompt(list(CAPTIONS), device="cpu", max_sequence_length=32)
    assert ours["prompt_embeds"].shape == embeds.shape == (3, 32, 48)
    assert float((ours["prompt_embeds"] - embeds).abs().max()) < 1e-6


def test_latents_are_the_pipelines_image_latents(base):
    from diffusers import Flux2KleinPipeline

    from finetune.models.families import FAMILIES

    pipe = Flux2KleinPipeline.from_pretrained(base)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ours = FAMILIES["flux2_klein"].encode_latents(pipe.vae, pixels)
        theirs = pipe._encode_vae_image(pixels, generator=None)
    assert ours.shape == (2, 16, 8, 8)
    assert float((ours - theirs).abs().max()) < 1e-6


@pytest.mark.parametrize("flow", [{}, {"timestep_sampling": "uniform", "resolution_shift": False}])
def test_packed_flow_loss_equals_the_pipelines_own_computation(tmp_path, base, flow):
    """A batch's loss, written out with the pipeline's pieces: `_encode_vae_image`, `_prepare_latent_ids`,
    `_pack_latents`, `_prepare_text_ids`, the transformer call with t / 1000 and no guidance,
    `_unpack_latents_with_ids`; sigmas from the scheduler's grid, shifted by diffusers' FLUX `calculate_shift`
    for the token count (default) or unshifted (diffusers' script)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from diffusers.training_utils import compute_density_for_timestep_sampling

    t = trainer(recipe(tmp_path, base, CASES["flux2_klein"], train={"flow": flow}, data={"cache_text": False}))
    pipe = Flux2KleinPipeline.from_pretrained(base)
    batch = next(iter(t.data.loader(0)))
    with torch.no_grad():
        loss, _ = t.compute_loss(batch)
        latents = pipe._encode_vae_image(batch["pixel_values"], generator=None)
        embeds, text_ids = pipe.encode_prompt(list(batch["captions"]), device="cpu", max_sequence_length=32)
        b, c, h, w = latents.shape
        sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0)
        noise, u = [], []
        for g in first_step_generators(t.recipe.train.seed, 0, 0, b):
            noise.append(torch.randn(latents.shape[1:], generator=g))
            u.append(compute_density_for_timestep_sampling("none" if flow else "logit_normal", 1, logit_mean=0.0,
                                                           logit_std=1.0, generator=g))
        noise, u = torch.stack(noise), torch.cat(u)
        sigmas = sched.sigmas[(u * 1000).long()]
        if not flow:
            c_ = sched.config
            mu = calculate_shift(h * w, c_.base_image_seq_len, c_.max_image_seq_len, c_.base_shift, c_.max_shift)
            sigmas = sched.time_shift(mu, 1.0, sigmas)
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        ids = pipe._prepare_latent_ids(noisy)
        tokens = pipe._pack_latents(noisy)
        out = pipe.transformer(hidden_states=tokens, timestep=sigmas * 1000 / 1000, guidance=None,
                               encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=ids, return_dict=False)[0]
        pred = pipe._unpack_latents_with_ids(out[:, : tokens.size(1)], ids, h, w)
        ref = ((pred - (noise - latents)) ** 2).reshape(b, -1).mean(1).mean()
    assert abs(float(loss) - float(ref)) < 1e-6, (float(loss), float(ref))


@pytest.mark.parametrize("distilled", [True, False])
def test_validation_pipeline_keeps_the_bases_distillation(tmp_path, tmp_path_factory, distilled):
    """The pipeline we assemble for validation keeps `is_distilled` from the base's model_index.json: the
    distilled [klein] samples without CFG whatever the scale, [klein] Base with it."""
    folder = build("flux2_klein", tmp_path_factory.mktemp("klein") / "k", distilled=distilled)
    t = trainer(recipe(tmp_path, folder, CASES["flux2_klein"]))
    pipe = t.comps.pipeline()
    assert pipe.config.is_distilled is distilled
    pipe._guidance_scale = 4.0
    assert pipe.do_classifier_free_guidance is (not distilled)
