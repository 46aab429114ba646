"""The flow families' defaults where tiny random models cannot show a mistake: a static shift the resolution
shift used to swallow, FLUX's training guidance, SD3's output preconditioning as a loss weighting, the T5 length
of each FLUX variant, the weights transformers keeps in fp32, and sd-scripts' FLUX target set. Each test failed
before its fix (issue 33). Real configs at real shapes: tests/test_real_shapes.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

# FLUX.1 [dev]'s scheduler_config.json (finetune/models/reference.py)
FLUX_DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                          max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def _objective(family: str, **flow):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from finetune.models.families import FAMILIES
    from finetune.sections import TrainSection
    from finetune.train.objectives import build_objective

    return build_objective(FAMILIES[family], FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER),
                           TrainSection(flow=flow))


@pytest.mark.parametrize("flow,sigma,words", [
    ({}, 0.7595, "resolution shift"),  # mu 1.15 at 1024 px: e^1.15 / (e^1.15 + 1)
    ({"shift": 5.0}, 5 * 0.5 / (1 + 4 * 0.5), "shift 5"),  # a static shift is the shift asked for
    ({"shift": 5.0, "resolution_shift": False}, 5 * 0.5 / (1 + 4 * 0.5), "shift 5"),
    ({"resolution_shift": False}, 0.5, "shift 1"),  # FLUX's base: the unshifted grid, as diffusers' script
])
def test_a_static_shift_is_applied_not_swallowed_by_the_resolution_shift(flow, sigma, words):
    """FLUX's family default shifts by resolution; `train.flow.shift` used to be ignored under it (sigma
    0.7595 at u = 0.5 with or without `shift: 5`) while the log still said 'resolution shift'."""
    objective = _objective("flux", **flow)
    latents = torch.zeros(1, 16, 128, 128)  # 1024 px: 64 x 64 = 4096 tokens after 2x2 packing
    got = float(objective.sigmas_for(torch.tensor([0.5]), latents))
    assert abs(got - sigma) < 1e-4, (flow, got)
    assert words in objective.describe()


def test_a_static_shift_with_the_resolution_shift_on_is_refused(tmp_path):
    from finetune.recipe import load_recipe
    from tests.helpers import draw_images, write_recipe

    path = write_recipe(tmp_path, "toy-flux", draw_images(tmp_path / "images"), model={"max_sequence_length": 32},
                        train={"flow": {"shift": 3.1582, "resolution_shift": True}})
    with pytest.raises(Exception, match=r"train.flow.shift .*resolution_shift: true"):
        load_recipe(path)


class _Transformer:
    """A FLUX transformer stand-in that records the guidance it is given."""

    def __init__(self, guidance_embeds: bool):
        self.config = {"guidance_embeds": guidance_embeds}
        self.seen = {}

    def __call__(self, hidden_states, **kwargs):
        self.seen = kwargs
        return (torch.zeros_like(hidden_states),)


@pytest.mark.parametrize("value,expected", [(None, 1.0), (0.0, 0.0), (3.5, 3.5)])
def test_flux_guidance_zero_means_zero(value, expected):
    """`model.guidance: 0` used to become 1.0 (`batch.get('guidance') or 1.0`); null keeps 1.0."""
    from finetune.models.families import FAMILIES

    den = _Transformer(guidance_embeds=True)
    batch = {} if value is None else {"guidance": value}
    FAMILIES["flux"].predict(den, torch.zeros(2, 16, 4, 4), torch.tensor([500.0, 250.0]),
                             {"prompt_embeds": torch.zeros(2, 3, 8), "pooled_prompt_embeds": torch.zeros(2, 8)}, batch)
    assert torch.equal(den.seen["guidance"], torch.full((2,), expected))


def test_precondition_weighting_is_sd3s_preconditioned_loss():
    """`weighting: precondition`: sigma^2 weights, which make the flow loss exactly the loss of SD3's
    preconditioned output (x0 predicted as x_t - sigma * v, diffusers' SD3 script's precondition_outputs)."""
    objective = _objective("sd3", weighting="precondition")
    latents = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    ex = objective.example(latents, [torch.Generator().manual_seed(i) for i in range(4)])
    v = torch.randn(latents.shape, generator=torch.Generator().manual_seed(9))  # any prediction
    s = ex.sigmas.view(-1, 1, 1, 1)
    ours = ex.weights * ((v - ex.target) ** 2).flatten(1).mean(1)
    theirs = ((ex.noisy - s * v - latents) ** 2).flatten(1).mean(1)
    assert torch.allclose(ex.weights, ex.sigmas ** 2)
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-6)
    assert "precondition weighting" in objective.describe()


@pytest.mark.parametrize("guidance,length", [(True, 512), (False, 256)])
def test_flux_t5_length_follows_the_variant(guidance, length):
    """[dev] was trained with 512 T5 tokens, [schnell] with 256 (it used to get 512 too); the recipe's
    `model.max_sequence_length` still wins."""
    from finetune.models.families import FAMILIES

    flux = FAMILIES["flux"]
    comps = SimpleNamespace(max_sequence_length=None, denoiser=_Transformer(guidance))
    assert flux.sequence_length(comps) == length
    assert flux.sequence_length(SimpleNamespace(max_sequence_length=77, denoiser=comps.denoiser)) == 77


def _tiny_t5(folder):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    T5EncoderModel(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cast_frozen_keeps_what_transformers_keeps_in_fp32(tmp_path, dtype):
    """T5 v1.1's `wo` (`_keep_in_fp32_modules`) stays fp32 in fp16 exactly as `from_pretrained(dtype=fp16)`
    loads it, so captions encode as in the pipeline; our cast used to put it in fp16, where T5 overflows."""
    from transformers import T5EncoderModel

    from finetune.models.components import cast_frozen

    folder = _tiny_t5(tmp_path / "t5")
    ours = T5EncoderModel.from_pretrained(folder, dtype=torch.float32).requires_grad_(False)  # frozen
    cast_frozen(SimpleNamespace(named_modules=lambda: {"text_encoder_2": ours}), dtype, dtype)
    reference = T5EncoderModel.from_pretrained(folder, dtype=dtype)
    theirs = {n: p.dtype for n, p in reference.named_parameters()}
    assert {n: p.dtype for n, p in ours.named_parameters()} == theirs
    wo = [n for n in theirs if ".wo." in n]
    assert len(wo) == 2 and all(theirs[n] == (torch.float32 if dtype == torch.float16 else dtype) for n in wo)


def test_flux_all_linear_mod_preset_is_sd_scripts_target_set():
    """sd-scripts trains every Linear of every block, modulation included: `all_linear` leaves the
    modulation out and said otherwise; `all_linear_mod` is sd-scripts' set."""
    import re

    from finetune.models.families import FAMILIES

    names = [f"transformer_blocks.0.{m}" for m in ("attn.to_q", "ff.net.2", "norm1.linear", "norm1_context.linear")]
    names += [f"single_transformer_blocks.3.{m}" for m in ("attn.to_v", "proj_mlp", "proj_out", "norm.linear")]
    names += ["proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1"]
    mod = FAMILIES["flux"].lora_targets("all_linear_mod")
    plain = FAMILIES["flux"].lora_targets("all_linear")
    assert [n for n in names if re.fullmatch(mod, n)] == names[:8]
    assert [n for n in names if re.fullmatch(plain, n)] == [n for n in names[:8] if "norm" not in n]


def test_a_positive_logit_mean_moves_training_toward_clean_samples():
    """Documented (docs/families.md), not changed: u indexes a grid that runs from noise to clean, so a positive
    `logit_mean` lowers sigma, the opposite sign of the SD3 paper's and sd-scripts' (where sigma = u)."""
    means = {}
    for mean in (-1.0, 0.0, 1.0):
        objective = _objective("sd3", logit_mean=mean)
        us = torch.cat([objective.draw_u(torch.Generator().manual_seed(i)) for i in range(400)])
        means[mean] = float(objective.sigmas_for(us, torch.zeros(1, 16, 64, 64)).mean())
    assert means[1.0] < 0.4 < means[0.0] < 0.6 < means[-1.0], means
