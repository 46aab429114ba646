"""Qwen-Image on a tiny model built offline: the text conditioning and the packed flow loss against
QwenImagePipeline's own prompt template, hidden states, latent normalisation, packing and transformer call.
Training, exports, DDP and resume: tests/test_qwen_families.py."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import first_step_generators
from tests.qwen_families import CAPTIONS, CASES, build, recipe, trainer


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build("qwen_image", tmp_path_factory.mktemp("tiny") / "qwen_image")


def test_template_is_the_pipelines(base):
    from diffusers import QwenImagePipeline

    from finetune.models.families.qwen_image import DROP, TEMPLATE

    pipe = QwenImagePipeline.from_pretrained(base)
    assert (TEMPLATE, DROP) == (pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx)
    # the tiny tokenizer splits the template's system part into exactly the 34 tokens the pipeline drops
    head = TEMPLATE.split("{}")[0]
    assert len(pipe.tokenizer(head).input_ids) == DROP


def test_text_is_the_pipelines_with_more_padding(base):
    """Ours pads to max_sequence_length; the pipeline to the batch's longest prompt: same states, same mask,
    then zeros."""
    from diffusers import QwenImagePipeline

    from finetune.models.base import resolve_base
    from finetune.models.components import LoadOptions, load_components

    comps = load_components(resolve_base(str(base)), LoadOptions(max_sequence_length=32))
    pipe = QwenImagePipeline.from_pretrained(base)
    with torch.no_grad():
        ours = comps.family.encode_prompt(comps, CAPTIONS, "cpu")
        embeds, mask = pipe.encode_prompt(list(CAPTIONS), device="cpu", max_sequence_length=32)
    n = embeds.shape[1]
    assert ours["prompt_embeds"].shape == (3, 32, 32) and n < 32
    assert float((ours["prompt_embeds"][:, :n] - embeds).abs().max()) < 1e-6
    assert torch.equal(ours["prompt_embeds_mask"][:, :n].long(), mask)
    assert float(ours["prompt_embeds"][:, n:].abs().max()) == 0 and not ours["prompt_embeds_mask"][:, n:].any()


def test_text_does_not_depend_on_the_tokenizers_padding_side(base):
    """The template's 34 tokens are dropped by position, which is right only with right padding: a tokenizer
    that pads on the left (its own config may say so) used to lose the caption instead (issue 33)."""
    from finetune.models.base import resolve_base
    from finetune.models.components import LoadOptions, load_components

    comps = load_components(resolve_base(str(base)), LoadOptions(max_sequence_length=32))
    with torch.no_grad():
        right = comps.family.encode_prompt(comps, CAPTIONS, "cpu")
        comps.tokenizer.padding_side = "left"
        left = comps.family.encode_prompt(comps, CAPTIONS, "cpu")
    assert torch.equal(left["prompt_embeds_mask"], right["prompt_embeds_mask"])
    assert float((left["prompt_embeds"] - right["prompt_embeds"]).abs().max()) == 0


@pytest.mark.parametrize("flow", [{}, {"timestep_sampling": "uniform", "resolution_shift": False}])
def test_packed_flow_loss_equals_the_pipelines_own_computation(tmp_path, base, flow):
    """A batch's loss, written out with the pipeline's pieces: latents normalised as QwenImageImg2ImgPipeline
    encodes them (one frame, per-channel mean / std), sigmas shifted by the pipeline's own `calculate_shift`
    through the scheduler's exponential `time_shift` (default) or the unshifted grid (diffusers' script),
    `_pack_latents` / `_unpack_latents`, `img_shapes`, timestep t / 1000, the pipeline's prompt embeddings
    (padded to the batch's longest prompt, not ours)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
    from diffusers.training_utils import compute_density_for_timestep_sampling

    t = trainer(recipe(tmp_path, base, CASES["qwen_image"], train={"flow": flow}, data={"cache_text": False}))
    pipe = QwenImagePipeline.from_pretrained(base)
    batch = next(iter(t.data.loader(0)))
    batch = {**batch, "captions": ["a red circle on a white background", "blue"]}  # a padded batch
    with torch.no_grad():
        loss, _ = t.compute_loss(batch)
        cfg = pipe.vae.config
        z = pipe.vae.encode(batch["pixel_values"].unsqueeze(2)).latent_dist.mode()
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1)
        latents = ((z - mean) * (1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1))).squeeze(2)
        embeds, mask = pipe.encode_prompt(batch["captions"], device="cpu", max_sequence_length=32)
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
            mu = calculate_shift((h // 2) * (w // 2), c_.base_image_seq_len, c_.max_image_seq_len, c_.base_shift,
                                 c_.max_shift)
            sigmas = sched.time_shift(mu, 1.0, sigmas)
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        packed = pipe._pack_latents(noisy, b, c, h, w)
        out = pipe.transformer(hidden_states=packed, timestep=sigmas * 1000 / 1000, encoder_hidden_states=embeds,
                               encoder_hidden_states_mask=mask, img_shapes=[[(1, h // 2, w // 2)]] * b,
                               return_dict=False)[0]
        f = pipe.vae_scale_factor
        pred = pipe._unpack_latents(out, h * f, w * f, f).squeeze(2)
        ref = ((pred - (noise - latents)) ** 2).reshape(b, -1).mean(1).mean()
    assert abs(float(loss) - float(ref)) < 1e-6, (float(loss), float(ref))


def test_longer_sequences_are_refused_in_one_line(tmp_path, base):
    from finetune.errors import RecipeError
    from finetune.recipe import load_recipe

    path = recipe(tmp_path, base, CASES["qwen_image"], model={"max_sequence_length": 2048})
    with pytest.raises(RecipeError, match="at most 1024 caption tokens"):
        load_recipe(path)


def test_every_adapter_parameter_gets_a_gradient(tmp_path, base):
    """The last block's text-stream outputs are read by nothing: adapters leave them out (else they never
    train and 2-process DDP stops on parameters without gradients)."""
    t = trainer(recipe(tmp_path, base, CASES["qwen_image"]))
    loss, _ = t.compute_loss(next(iter(t.data.loader(0))))
    loss.backward()
    trained = {n: p for n, p in t.comps.denoiser.named_parameters() if p.requires_grad}
    assert trained and not [n for n, p in trained.items() if p.grad is None]
    assert not any(n.startswith("transformer_blocks.1.txt_mlp") for n in trained)
    assert any(n.startswith("transformer_blocks.0.txt_mlp") for n in trained)
