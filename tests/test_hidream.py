"""HiDream-I1 on a tiny model built offline: the four encoders' conditioning against HiDreamImagePipeline's own
`encode_prompt`, the flow loss against the pipeline's transformer call (output negated), the latents against the
pipeline's normalisation, and the mixture-of-experts decision (the presets leave the routed experts and the
gate alone; all_linear adapts every expert, and the routed ones learn). Training, every adapter kind, exports,
DDP and resume: tests/test_qwen_families.py (table-driven, HiDream is one of its cases)."""

from __future__ import annotations

import pytest
import torch

from tests.qwen_families import CAPTIONS, CASES, build, first_step_noise_and_sigmas, recipe, trainer


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build("hidream", tmp_path_factory.mktemp("tiny") / "hidream")


def test_text_is_the_pipelines(base):
    """T5 states, every Llama layer (kept batch-first) and the two CLIPs' pooled outputs, concatenated."""
    from diffusers import HiDreamImagePipeline

    from finetune.models.base import resolve_base
    from finetune.models.components import LoadOptions, load_components

    comps = load_components(resolve_base(str(base)), LoadOptions(max_sequence_length=32))
    pipe = HiDreamImagePipeline.from_pretrained(base)
    with torch.no_grad():
        ours = comps.family.encode_prompt(comps, CAPTIONS, "cpu")
        t5, _, llama, _, pooled, _ = pipe.encode_prompt(CAPTIONS, device="cpu", do_classifier_free_guidance=False,
                                                        max_sequence_length=32)
    assert ours["prompt_embeds"].shape == t5.shape == (3, 32, 32)
    assert llama.shape == (2, 3, 32, 16) and ours["llama_embeds"].shape == (3, 2, 32, 16)  # layers, batch swapped
    assert pooled.shape == ours["pooled_prompt_embeds"].shape == (3, 32)
    for a, b in ((ours["prompt_embeds"], t5), (ours["llama_embeds"].transpose(0, 1), llama),
                 (ours["pooled_prompt_embeds"], pooled)):
        assert float((a - b).abs().max()) < 1e-6


def test_latents_are_what_the_pipeline_decodes(base):
    from diffusers import HiDreamImagePipeline

    from finetune.models.families import FAMILIES

    vae = HiDreamImagePipeline.from_pretrained(base).vae
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ours = FAMILIES["hidream"].encode_latents(vae, pixels)
        mode = vae.encode(pixels).latent_dist.mode()
    assert ours.shape == (2, 16, 16, 16)
    assert float((ours / vae.config.scaling_factor + vae.config.shift_factor - mode).abs().max()) < 1e-6


@pytest.mark.parametrize("flow", [{}, {"timestep_sampling": "uniform"}])
def test_flow_loss_equals_the_pipelines_own_computation(tmp_path, base, flow):
    """The pipeline's transformer call (t as is, the output negated) on the scheduler's shift-3 grid, logit-normal
    (default) or uniform."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline

    t = trainer(recipe(tmp_path, base, CASES["hidream"], train={"flow": flow}, data={"cache_text": False}))
    pipe = HiDreamImagePipeline.from_pretrained(base)
    batch = next(iter(t.data.loader(0)))
    with torch.no_grad():
        loss, _ = t.compute_loss(batch)
        latents = t.encode_latents(batch["pixel_values"])
        t5, _, llama, _, pooled, _ = pipe.encode_prompt(list(batch["captions"]), device="cpu",
                                                        do_classifier_free_guidance=False, max_sequence_length=32)
        sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        noise, sigmas = first_step_noise_and_sigmas(t, latents, sched, flow, None)
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        out = pipe.transformer(hidden_states=noisy, timesteps=sigmas * 1000, encoder_hidden_states_t5=t5,
                               encoder_hidden_states_llama3=llama, pooled_embeds=pooled, return_dict=False)[0]
        ref = ((-out - (noise - latents)) ** 2).reshape(latents.shape[0], -1).mean(1).mean()
    assert abs(float(loss) - float(ref)) < 1e-6, (float(loss), float(ref))


def test_routed_experts_get_no_gradient_so_adapters_leave_them_out(tmp_path, base):
    """The MoE decision: in the mode the trainer keeps the denoiser (eval, as loaded), a backward pass reaches the
    shared expert's weights but none of the routed experts' (diffusers' moe_infer runs under no_grad); the presets
    adapt the shared expert and no routed one, and targets reaching the routed experts stop `--check` in one
    line."""
    import subprocess
    import sys

    from diffusers import HiDreamImageTransformer2DModel

    from tests.helpers import ROOT
    from tests.qwen_families import fixed_text

    model = HiDreamImageTransformer2DModel.from_pretrained(base / "transformer")
    assert not model.training
    ff = model.double_stream_blocks[0].block.ff_i
    for p in (ff.shared_experts.w1.weight, *(e.w1.weight for e in ff.experts)):
        p.requires_grad_(True)
    text = fixed_text(CASES["hidream"], torch.Generator().manual_seed(0))
    from finetune.models.families import FAMILIES

    out = FAMILIES["hidream"].predict(model, torch.randn(2, 16, 16, 16), torch.tensor([300.0, 800.0]), text, {})
    out.square().mean().backward()
    assert ff.shared_experts.w1.weight.grad is not None and float(ff.shared_experts.w1.weight.grad.abs().max()) > 0
    assert all(e.w1.weight.grad is None for e in ff.experts)

    t = trainer(recipe(tmp_path, base, CASES["hidream"]))
    adapted = {n for n, m in t.comps.denoiser.named_modules() if hasattr(m, "lora_A")}
    assert any("shared_experts" in n for n in adapted) and not any(".experts." in n for n in adapted)
    path = recipe(tmp_path / "experts", base, CASES["hidream"], method={"targets": ["to_q", "experts.0.w1"]})
    out = subprocess.run([sys.executable, "-m", "finetune", str(path), "--check"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 2 and "routed experts" in out.stderr and "Traceback" not in out.stderr


def test_detected_by_its_transformer_beside_four_encoders():
    from finetune.models.detect import family_from_configs

    index = {"transformer": ["diffusers", "HiDreamImageTransformer2DModel"],
             "text_encoder_4": ["transformers", "LlamaForCausalLM"]}
    assert family_from_configs(index, {}, {"model_type": "clip_text_model"}).name == "hidream"
