"""Z-Image on a tiny model built offline: the text conditioning and the flow loss against ZImagePipeline's own
prompt encoding, latent scaling and transformer call (time reversed, output negated). Training, exports,
DDP and resume: tests/test_qwen_families.py."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import first_step_generators
from tests.qwen_families import CAPTIONS, CASES, build, recipe, trainer


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build("z_image", tmp_path_factory.mktemp("tiny") / "z_image")


def test_text_is_the_pipelines_captions(base):
    """Our fixed-length, zero-padded states cut by their mask are ZImagePipeline's variable-length captions:
    the chat template with thinking on, the second-to-last hidden state, prompt tokens only."""
    from diffusers import ZImagePipeline

    from finetune.models.base import resolve_base
    from finetune.models.components import LoadOptions, load_components
    from finetune.models.families.z_image import captions_of

    comps = load_components(resolve_base(str(base)), LoadOptions(max_sequence_length=32))
    pipe = ZImagePipeline.from_pretrained(base)
    with torch.no_grad():
        ours = comps.family.encode_prompt(comps, CAPTIONS, "cpu")
        theirs, _ = pipe.encode_prompt(list(CAPTIONS), device="cpu", do_classifier_free_guidance=False,
                                       max_sequence_length=32)
    assert ours["prompt_embeds"].shape == (3, 32, 16)
    mine = captions_of(ours)
    assert [len(e) for e in mine] == [len(e) for e in theirs] and len(theirs[1]) < len(theirs[0]) < 32
    assert max(float((a - b).abs().max()) for a, b in zip(mine, theirs, strict=True)) < 1e-6
    assert float(ours["prompt_embeds"][1, len(theirs[1]):].abs().max()) == 0.0  # padding is zero


@pytest.mark.parametrize("flow", [{}, {"timestep_sampling": "uniform"}])
def test_flow_loss_equals_the_pipelines_own_computation(tmp_path, base, flow):
    """A batch's loss, written out with the pipeline's pieces: latents scaled as ZImageImg2ImgPipeline
    encodes them, sigmas from the base's scheduler (static shift 3), the transformer given 1 - sigma and a
    list of [C, 1, H, W] latents with the pipeline's own caption list, its output negated (as the pipeline
    does before the scheduler step) against the flow target noise - x0."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from diffusers.training_utils import compute_density_for_timestep_sampling

    t = trainer(recipe(tmp_path, base, CASES["z_image"], train={"flow": flow}))
    assert t.objective.describe().startswith("flow, " + ("uniform" if flow else "logit_normal") + ", shift 3")
    pipe = ZImagePipeline.from_pretrained(base)
    batch = next(iter(t.data.loader(0)))
    with torch.no_grad():
        loss, _ = t.compute_loss(batch)
        pixels = batch["pixel_values"]
        raw = pipe.vae.encode(pixels).latent_dist.mode()
        latents = (raw - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        captions, _ = pipe.encode_prompt(list(batch["captions"]), device="cpu", do_classifier_free_guidance=False,
                                         max_sequence_length=32)
        sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        b = latents.shape[0]
        noise, u = [], []
        for g in first_step_generators(t.recipe.train.seed, 0, 0, b):
            noise.append(torch.randn(latents.shape[1:], generator=g))
            u.append(compute_density_for_timestep_sampling("none" if flow else "logit_normal", 1, logit_mean=0.0,
                                                           logit_std=1.0, generator=g))
        noise, u = torch.stack(noise), torch.cat(u)
        sigmas = sched.sigmas[(u * 1000).long()]
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        timestep = (1000 - sigmas * 1000) / 1000
        out = pipe.transformer(list(noisy.unsqueeze(2).unbind(0)), timestep, captions, return_dict=False)[0]
        pred = -torch.stack([o.float() for o in out]).squeeze(2)
        ref = ((pred - (noise - latents)) ** 2).reshape(b, -1).mean(1).mean()
    assert abs(float(loss) - float(ref)) < 1e-6, (float(loss), float(ref))


def test_padding_does_not_change_the_prediction(base):
    """`predict` cuts each caption back to its tokens: extra zero padding changes nothing."""
    from diffusers import ZImagePipeline

    from finetune.models.families import FAMILIES

    pipe = ZImagePipeline.from_pretrained(base)
    g = torch.Generator().manual_seed(0)
    noisy, embeds = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 6, 16, generator=g)
    mask = torch.tensor([[1.0] * 6, [1.0] * 4 + [0.0] * 2])
    short = {"prompt_embeds": embeds * mask[..., None], "prompt_mask": mask}
    longer = {"prompt_embeds": torch.cat([short["prompt_embeds"], torch.zeros(2, 10, 16)], 1),
              "prompt_mask": torch.cat([mask, torch.zeros(2, 10)], 1)}
    family = FAMILIES["z_image"]
    with torch.no_grad():
        a = family.predict(pipe.transformer, noisy, torch.tensor([200.0, 700.0]), short, {})
        b = family.predict(pipe.transformer, noisy, torch.tensor([200.0, 700.0]), longer, {})
    assert float((a - b).abs().max()) < 1e-6
