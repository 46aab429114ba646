"""Sana on a tiny model built offline: the text conditioning (complex human instruction, Gemma's last state, the
pipeline's token selection) and the flow loss against SanaPipeline's own pieces, the DC-AE latents against the
pipeline's scaling, the training grid from the DPM-Solver sampler's flow_shift, detection against Sana Sprint, and
LoRA through the linear attention. Training, every adapter kind, exports, DDP and resume:
tests/test_qwen_families.py (table-driven, Sana is one of its cases)."""

from __future__ import annotations

import pytest
import torch

from tests.qwen_families import CAPTIONS, CASES, build, first_step_noise_and_sigmas, recipe, trainer


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build("sana", tmp_path_factory.mktemp("tiny") / "sana")


def test_text_and_mask_are_the_pipelines(base):
    """`encode_prompt` with the CHI `__call__` uses by default, on captions with capitals and spaces (the
    pipeline lower-cases and strips them)."""
    from diffusers import SanaPipeline

    from finetune.models.base import resolve_base
    from finetune.models.components import LoadOptions, load_components
    from finetune.models.families.sana import complex_human_instruction

    comps = load_components(resolve_base(str(base)), LoadOptions(max_sequence_length=32))
    pipe = SanaPipeline.from_pretrained(base)
    captions = [" A Red Circle on a white background", *CAPTIONS[1:]]
    with torch.no_grad():
        ours = comps.family.encode_prompt(comps, captions, "cpu")
        embeds, mask, *_ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, device="cpu",
                                              max_sequence_length=32,
                                              complex_human_instruction=list(complex_human_instruction()))
    assert ours["prompt_embeds"].shape == embeds.shape == (3, 32, 16)
    assert float((ours["prompt_embeds"] - embeds).abs().max()) < 1e-6
    assert torch.equal(ours["prompt_attention_mask"], mask)
    assert mask.sum(1).tolist() == [8, 2, 2]  # <bos>, the instruction's last token, the caption
    assert len(complex_human_instruction()) == 8 and complex_human_instruction()[-1] == "User Prompt: "


def test_latents_are_the_dc_aes_scaled(base):
    """DC-AE latents have no distribution: `encode(...).latent * scaling_factor` (diffusers' Sana script), which
    SanaPipeline divides back before decoding."""
    from diffusers import SanaPipeline

    from finetune.models.families import FAMILIES

    vae = SanaPipeline.from_pretrained(base).vae
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ours = FAMILIES["sana"].encode_latents(vae, pixels)
        raw = vae.encode(pixels).latent
    assert ours.shape == (2, 8, 16, 16)
    assert float((ours / vae.config.scaling_factor - raw).abs().max()) < 1e-6
    assert float((ours - raw).abs().max()) > 1e-2


def test_training_grid_has_the_samplers_flow_shift(base):
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    from finetune.models.families import FAMILIES

    sampler = DPMSolverMultistepScheduler.from_pretrained(base / "scheduler")
    grid = FAMILIES["sana"].training_scheduler(sampler)
    assert sampler.config.flow_shift == 3.0 and isinstance(grid, FlowMatchEulerDiscreteScheduler)
    assert torch.allclose(grid.sigmas, FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas)


@pytest.mark.parametrize("flow", [{}, {"timestep_sampling": "uniform"}])
def test_flow_loss_equals_the_pipelines_own_computation(tmp_path, base, flow):
    """A batch's loss written out as SanaPipeline drives the transformer: `encode_prompt` (with the CHI), the
    timestep sigma * 1000 * timestep_scale, the velocity output against noise - x0; sigmas from the FlowMatch grid
    shifted by flow_shift 3, logit-normal (default) or uniform."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline

    from finetune.models.families.sana import complex_human_instruction

    t = trainer(recipe(tmp_path, base, CASES["sana"], train={"flow": flow}, data={"cache_text": False}))
    pipe = SanaPipeline.from_pretrained(base)
    batch = next(iter(t.data.loader(0)))
    with torch.no_grad():
        loss, _ = t.compute_loss(batch)
        latents = t.encode_latents(batch["pixel_values"])
        embeds, mask, *_ = pipe.encode_prompt(list(batch["captions"]), do_classifier_free_guidance=False,
                                              device="cpu", max_sequence_length=32,
                                              complex_human_instruction=list(complex_human_instruction()))
        sched = FlowMatchEulerDiscreteScheduler(shift=pipe.scheduler.config.flow_shift)
        noise, sigmas = first_step_noise_and_sigmas(t, latents, sched, flow, None)
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        out = pipe.transformer(noisy, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                               timestep=sigmas * 1000 * pipe.transformer.config.timestep_scale, return_dict=False)[0]
        ref = ((out - (noise - latents)) ** 2).reshape(latents.shape[0], -1).mean(1).mean()
    assert abs(float(loss) - float(ref)) < 1e-6, (float(loss), float(ref))


def test_sana_and_sana_sprint_never_mistaken(tmp_path):
    """Sana Sprint (a consistency model with TrigFlow time) has Sana's transformer class: its pipeline class in
    model_index.json tells it, and it is refused rather than trained with the flow loss."""
    from finetune.errors import ModelError
    from finetune.models.detect import family_from_configs, family_of_folder

    sana = {"_class_name": "SanaPipeline", "transformer": ["diffusers", "SanaTransformer2DModel"]}
    sprint = {**sana, "_class_name": "SanaSprintPipeline"}
    assert family_from_configs(sana, {}, {"model_type": "gemma2"}).name == "sana"
    assert not any(f.name == "sana" for f in _matching(sprint))
    folder = tmp_path / "sprint"
    folder.mkdir()
    (folder / "model_index.json").write_text(__import__("json").dumps(sprint))
    with pytest.raises(ModelError, match="no family recognises"):
        family_of_folder(folder)


def _matching(index):
    from finetune.models.families import FAMILIES

    return [f for f in FAMILIES.values() if f.matches(index, {"guidance_embeds": True}, {"model_type": "gemma2"})]


def test_lora_on_the_linear_attention_alone_trains_and_reloads(tmp_path, base):
    """The decision in finetune/models/families/sana.py: the linear self-attention's projections take plain LoRA.
    Adapting only attn1 (the ReLU-kernel attention), the first step gives its keys' adapter a gradient through the
    kernel, three steps move the output, and the export reloads in the stock pipeline."""
    from diffusers import SanaPipeline

    from tests.qwen_families import fixed_output

    case = CASES["sana"]
    t = trainer(recipe(tmp_path, base, case, method={"targets": ["attn1.to_q", "attn1.to_k", "attn1.to_v"]},
                       train={"lr": 5e-2}))
    adapted = {n for n, m in t.comps.denoiser.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {f"transformer_blocks.{i}.attn1.to_{x}" for i in (0, 1) for x in "qkv"}
    loss, _ = t.compute_loss(next(iter(t.data.loader(0))))
    loss.backward()
    # B starts at zero, so A's gradient does too: B's is what the kernel passes back on the first step
    grad = t.comps.denoiser.get_submodule("transformer_blocks.0.attn1.to_k").lora_B["default"].weight.grad
    assert grad is not None and float(grad.abs().max()) > 0
    t.comps.denoiser.zero_grad(set_to_none=True)
    before = fixed_output(case, SanaPipeline.from_pretrained(base).transformer)
    t.run()
    trained = fixed_output(case, t.comps.denoiser)
    assert float((trained - before).abs().max()) > 1e-3
    pipe = SanaPipeline.from_pretrained(base)
    pipe.load_lora_weights(tmp_path / "out")
    assert float((fixed_output(case, pipe.transformer) - trained).abs().max()) < 1e-4


def test_validation_passes_the_mask_and_samples_with_cfg(tmp_path, base):
    t = trainer(recipe(tmp_path, base, CASES["sana"]))
    family = t.comps.family
    text = family.encode_prompt(t.comps, ["a red circle"], "cpu")
    kwargs = family.pipeline_prompt_kwargs(text, text)
    assert kwargs["prompt_attention_mask"].shape == kwargs["negative_prompt_attention_mask"].shape == (1, 32)
    assert family.guidance_kwargs(t.comps.pipeline(), None) == {"guidance_scale": 4.5}
