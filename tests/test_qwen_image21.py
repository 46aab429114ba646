"""Qwen-Image 2.1 on a tiny model built offline: the text conditioning (the pipeline's own text-only encoding, one
caption at a time, through the processor loaded without its torchvision-bound video processor), the RGBA latents
against the pipeline's `_encode_vae_image`, the flow loss against the pipeline's pieces, per-sample prediction
against single-prompt calls, detection against Qwen-Image, and validation's trimmed embeddings. Training, every
adapter kind, exports, DDP and resume: tests/test_qwen_families.py (table-driven, Qwen-Image 2.1 is one of its
cases)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.qwen_families import CASES, build, first_step_noise_and_sigmas, recipe, stock, trainer

CAPTIONS = ["a red circle on a white background", "blue", ""]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build("qwen_image21", tmp_path_factory.mktemp("tiny") / "qwen_image21")


def test_text_is_the_pipelines_single_prompt_encoding(base):
    """Each caption's states are what `encode_prompt` gives for it alone (no padding), stored right-padded with a
    mask; the processor is the family's text-only Qwen3VLProcessor (no video processor, no torchvision)."""
    from transformers import Qwen3VLProcessor

    from finetune.models.base import resolve_base
    from finetune.models.components import LoadOptions, load_components

    comps = load_components(resolve_base(str(base)), LoadOptions(max_sequence_length=32))
    processor = comps.tokenizer_for("text_encoder")
    assert isinstance(processor, Qwen3VLProcessor) and not hasattr(processor, "video_processor")
    pipe = stock(CASES["qwen_image21"], base)
    with torch.no_grad():
        ours = comps.family.encode_prompt(comps, CAPTIONS, "cpu")
        alone = [pipe.encode_prompt([c], device="cpu")[0][0] for c in CAPTIONS]
    assert ours["prompt_embeds"].shape == (3, 32, 16)
    assert ours["prompt_embeds_mask"].sum(1).tolist() == [len(a) for a in alone] == [15, 11, 9]
    for i, states in enumerate(alone):
        assert float((ours["prompt_embeds"][i, :len(states)] - states).abs().max()) < 1e-6
        assert torch.count_nonzero(ours["prompt_embeds"][i, len(states):]) == 0


def test_latents_are_the_pipelines_rgba_encoding(base):
    """An RGB image enters the RGBA VAE as the pipeline's `convert("RGBA")` + preprocess makes it (alpha 1), and
    the normalised mode equals `_encode_vae_image`."""
    from PIL import Image

    from finetune.models.families import FAMILIES

    pipe = stock(CASES["qwen_image21"], base)
    rgb = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    pixels = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        ours = FAMILIES["qwen_image21"].encode_latents(pipe.vae, pixels)
        rgba = pipe.image_processor.preprocess(Image.fromarray(rgb).convert("RGBA"), width=64, height=64)
        ref = pipe._encode_vae_image(rgba.unsqueeze(2), None).squeeze(2)
    assert rgba.shape[1] == 4 and ours.shape == ref.shape == (1, 16, 4, 4)
    assert float((ours - ref).abs().max()) < 1e-5


@pytest.mark.parametrize("flow", [{}, {"timestep_sampling": "uniform", "resolution_shift": False}])
def test_flow_loss_equals_the_pipelines_own_computation(tmp_path, base, flow):
    """A batch's loss written out as QwenImage21Pipeline drives the transformer for each prompt: `encode_prompt`,
    `_pack_latents`, the target's slots after the text, t / 1000, the last h * w output tokens; sigmas shifted by
    `calculate_shift` of the token count (one per latent pixel), or uniform unshifted."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    t = trainer(recipe(tmp_path, base, CASES["qwen_image21"], train={"flow": flow}, data={"cache_text": False}))
    pipe = stock(CASES["qwen_image21"], base)
    batch = next(iter(t.data.loader(0)))
    with torch.no_grad():
        loss, _ = t.compute_loss(batch)
        latents = t.encode_latents(batch["pixel_values"])
        b, c, h, w = latents.shape
        sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        noise, sigmas = first_step_noise_and_sigmas(t, latents, sched, flow, h * w)
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        preds = []
        for i, caption in enumerate(batch["captions"]):
            embeds, mask, pad = pipe.encode_prompt([caption], device="cpu")
            slots = torch.cat([pad, pad.new_ones(1, h * w // 4)], dim=1)  # the pipeline's append_target_slots
            packed = pipe._pack_latents(noisy[i:i + 1], 1, c, h, w)
            out = pipe.transformer(hidden_states=packed, timestep=sigmas[i:i + 1] * 1000 / 1000,
                                   encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
                                   img_shapes=[[(1, h, w)]], img_mask=slots, return_dict=False)[0][:, -h * w:]
            preds.append(out.transpose(1, 2).reshape(1, c, h, w))
        ref = ((torch.cat(preds) - (noise - latents)) ** 2).reshape(b, -1).mean(1).mean()
    assert abs(float(loss) - float(ref)) < 1e-6, (float(loss), float(ref))


def test_a_batch_predicts_as_single_prompts(base):
    """Captions of different lengths in one batch: each sample's prediction is the one its caption gets alone
    (padding would move the image's rotary frame position; `predict` cuts it off per sample)."""
    from finetune.models.base import resolve_base
    from finetune.models.components import LoadOptions, load_components

    comps = load_components(resolve_base(str(base)), LoadOptions(max_sequence_length=32))
    family, den = comps.family, comps.denoiser
    g = torch.Generator().manual_seed(0)
    latents, t = torch.randn(3, 16, 4, 4, generator=g), torch.tensor([200.0, 500.0, 900.0])
    with torch.no_grad():
        text = family.encode_prompt(comps, CAPTIONS, "cpu")
        batched = family.predict(den, latents, t, text, {})
        alone = [family.predict(den, latents[i:i + 1], t[i:i + 1], {k: v[i:i + 1] for k, v in text.items()}, {})
                 for i in range(3)]
        padded = {"prompt_embeds": text["prompt_embeds"][:1], "prompt_embeds_mask": torch.ones(1, 32)}
        moved = family.predict(den, latents[:1], t[:1], padded, {})  # padding read as text: a different answer
    assert float((batched - torch.cat(alone)).abs().max()) < 1e-6
    assert float((moved - alone[0]).abs().max()) > 1e-4


def test_qwen_image21_and_qwen_image_never_mistaken():
    from finetune.models.detect import family_from_configs

    new = {"transformer": ["diffusers", "QwenImage21Transformer2DModel"], "processor": ["transformers",
                                                                                        "Qwen3VLProcessor"]}
    old = {"transformer": ["diffusers", "QwenImageTransformer2DModel"], "tokenizer": ["transformers", "Qwen2Tokenizer"]}
    assert family_from_configs(new, {}, {"model_type": "qwen3_vl"}).name == "qwen_image21"
    assert family_from_configs(old, {}, {"model_type": "qwen2_5_vl"}).name == "qwen_image"


def test_validation_gets_the_captions_own_length_and_true_cfg(tmp_path, base):
    t = trainer(recipe(tmp_path, base, CASES["qwen_image21"]))
    family = t.comps.family
    text = family.encode_prompt(t.comps, ["blue"], "cpu")
    negative = family.encode_prompt(t.comps, [""], "cpu")
    kwargs = family.pipeline_prompt_kwargs(text, negative)
    assert kwargs["prompt_embeds"].shape == (1, 11, 16) and kwargs["negative_prompt_embeds"].shape == (1, 9, 16)
    assert family.guidance_kwargs(t.comps.pipeline(), None) == {"true_cfg_scale": 1.0}
