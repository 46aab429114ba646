"""HunyuanImage 2.1 on a tiny model built offline: the text conditioning (Qwen2.5-VL's third-to-last state and the
byT5 glyph states of quoted text, with their masks) and the flow loss against HunyuanImagePipeline's own pieces,
the latents against the pipeline's scaling, the glyph decision, detection against the refiner and the distilled
checkpoint, validation through the base's guiders, and the 'bfl' LoRA form under the names ComfyUI's HunyuanImage
model has. Training, every adapter kind (reloaded through the transformer's `load_lora_adapter`: the pipeline has no
LoRA loader), exports, DDP and resume: tests/test_qwen_families.py (table-driven, HunyuanImage is one of its cases)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tests.qwen_families import CASES, build, recipe, trainer

QUOTED = ['a red sign that says "OPEN" on a white wall', "blue", "", "a mug printed with 'hi' and \u201cok\u201d"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build("hunyuanimage", tmp_path_factory.mktemp("tiny") / "hunyuanimage")


def stock(base, tokens: int = 32):
    """The stock pipeline, its fixed Qwen length (1000 tokens) set to the tiny recipes' caption length."""
    from diffusers import HunyuanImagePipeline

    pipe = HunyuanImagePipeline.from_pretrained(base)
    pipe.tokenizer_max_length = tokens
    return pipe


def test_text_glyphs_and_masks_are_the_pipelines(base):
    """Captions with and without quoted text: Qwen's states and mask, the byT5 glyph states and mask, as
    `encode_prompt` makes them; the captions without quotes get zero glyph states and an all-zero mask."""
    from finetune.models.base import resolve_base
    from finetune.models.components import LoadOptions, load_components

    comps = load_components(resolve_base(str(base)), LoadOptions(max_sequence_length=32))
    pipe = stock(base)
    with torch.no_grad():
        ours = comps.family.encode_prompt(comps, QUOTED, "cpu")
        embeds, mask, glyphs, glyph_mask = pipe.encode_prompt(QUOTED, device="cpu", batch_size=len(QUOTED))
    assert ours["prompt_embeds"].shape == embeds.shape == (4, 32, 32)
    assert ours["prompt_embeds_2"].shape == glyphs.shape == (4, 128, 16)
    assert float((ours["prompt_embeds"] - embeds).abs().max()) < 1e-6
    assert float((ours["prompt_embeds_2"] - glyphs).abs().max()) < 1e-6
    assert torch.equal(ours["prompt_embeds_mask"], mask) and torch.equal(ours["prompt_embeds_mask_2"], glyph_mask)
    # byT5 tokens: 'Text "OPEN". ' is 13 bytes + </s>; 'Text "hi". Text "ok". ' is 22 + 1
    assert glyph_mask.sum(1).tolist() == [14, 0, 0, 23]
    assert float(glyphs[1:3].abs().max()) == 0.0 and float(glyphs[0].abs().max()) > 0


def test_latents_are_the_vaes_mode_scaled(base):
    """HunyuanImagePipeline decodes `latents / scaling_factor`: training takes the mode times it, no shift."""
    from finetune.models.families import FAMILIES

    vae = stock(base).vae
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ours = FAMILIES["hunyuanimage"].encode_latents(vae, pixels)
        mode = vae.encode(pixels).latent_dist.mode()
    assert ours.shape == (2, 16, 16, 16)
    assert float((ours / vae.config.scaling_factor - mode).abs().max()) < 1e-6
    assert float((ours - mode).abs().max()) > 1e-2


def draw(t, latents, sched, density: str):
    """(noise, sigmas) of a trainer's first step: its per-sample generators, diffusers' density helper, the
    statically shifted grid."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from tests.helpers import first_step_generators

    noise, u = [], []
    for g in first_step_generators(t.recipe.train.seed, 0, 0, latents.shape[0]):
        noise.append(torch.randn(latents.shape[1:], generator=g))
        u.append(compute_density_for_timestep_sampling(density, 1, logit_mean=0.0, logit_std=1.0, generator=g))
    return torch.stack(noise), sched.sigmas[(torch.cat(u) * 1000).long()]


@pytest.mark.parametrize("flow,density", [({}, "none"), ({"timestep_sampling": "logit_normal"}, "logit_normal")])
def test_flow_loss_equals_the_pipelines_own_computation(tmp_path, base, flow, density):
    """A batch's loss written out as HunyuanImagePipeline drives the transformer: `encode_prompt` (Qwen and glyph
    states, both masks), the timestep sigma * 1000, the velocity against noise - x0; sigmas from the scheduler's
    grid with its static shift 5, uniform (the family's default, sd-scripts') or logit-normal."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    t = trainer(recipe(tmp_path, base, CASES["hunyuanimage"], train={"flow": flow}, data={"cache_text": False}))
    pipe = stock(base)
    batch = next(iter(t.data.loader(0)))
    with torch.no_grad():
        loss, _ = t.compute_loss(batch)
        latents = t.encode_latents(batch["pixel_values"])
        captions = list(batch["captions"])
        embeds, mask, glyphs, glyph_mask = pipe.encode_prompt(captions, device="cpu", batch_size=len(captions))
        sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        assert sched.config.shift == 5.0
        noise, sigmas = draw(t, latents, sched, density)
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        out = pipe.transformer(hidden_states=noisy, timestep=sigmas * 1000, encoder_hidden_states=embeds,
                               encoder_attention_mask=mask, encoder_hidden_states_2=glyphs,
                               encoder_attention_mask_2=glyph_mask, return_dict=False)[0]
        ref = ((out - (noise - latents)) ** 2).reshape(latents.shape[0], -1).mean(1).mean()
    assert abs(float(loss) - float(ref)) < 1e-6, (float(loss), float(ref))


def test_glyph_states_reach_the_prediction_through_their_mask(base):
    """The decision in finetune/models/families/hunyuanimage.py: glyph states enter the denoiser beside Qwen's
    (a caption's quoted text changes the prediction), and states under a zero mask (captions without quotes)
    change nothing."""
    from finetune.models.families import FAMILIES

    pipe = stock(base)
    g = torch.Generator().manual_seed(0)
    latents, embeds = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 8, 32, generator=g)
    glyphs, other = torch.randn(1, 128, 16, generator=g), torch.randn(1, 128, 16, generator=g)
    on, off = (torch.arange(128) < 10).long()[None], torch.zeros(1, 128, dtype=torch.long)
    family, t = FAMILIES["hunyuanimage"], torch.tensor([500.0])

    def pred(states, mask):
        text = {"prompt_embeds": embeds, "prompt_embeds_mask": torch.ones(1, 8, dtype=torch.long),
                "prompt_embeds_2": states, "prompt_embeds_mask_2": mask}
        with torch.no_grad():
            return family.predict(pipe.transformer, latents, t, text, {})

    assert float((pred(glyphs, on) - pred(other, on)).abs().max()) > 1e-4
    assert float((pred(glyphs, off) - pred(other, off)).abs().max()) < 1e-6
    assert float((pred(glyphs, off) - pred(glyphs, on)).abs().max()) > 1e-4


def test_the_refiner_and_the_distilled_model_are_not_trained(tmp_path, base):
    """The refiner shares the transformer class (its pipeline class tells it); the distilled checkpoint is this
    pipeline with a guidance-distilled MeanFlow transformer: refused in one line, naming the base to train."""
    import shutil
    import subprocess
    import sys

    from finetune.models.detect import family_from_configs
    from tests.helpers import ROOT

    index = {"_class_name": "HunyuanImagePipeline", "transformer": ["diffusers", "HunyuanImageTransformer2DModel"]}
    refiner = {**index, "_class_name": "HunyuanImageRefinerPipeline"}
    assert family_from_configs(index, {}, {"model_type": "qwen2_5_vl"}).name == "hunyuanimage"
    from finetune.models.families import FAMILIES
    assert not any(f.matches(refiner, {}, {"model_type": "qwen2_5_vl"}) for f in FAMILIES.values())

    distilled = tmp_path / "distilled"
    shutil.copytree(base, distilled)
    config = distilled / "transformer" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"guidance_embeds": True, "use_meanflow": True}))
    path = recipe(tmp_path, distilled, CASES["hunyuanimage"])
    out = subprocess.run([sys.executable, "-m", "finetune", str(path), "--check"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "HunyuanImage 2.1 Distilled" in out.stderr and "Traceback" not in out.stderr


def test_validation_passes_both_texts_and_sets_the_guiders_scale(tmp_path, base):
    t = trainer(recipe(tmp_path, base, CASES["hunyuanimage"]))
    family = t.comps.family
    text = family.encode_prompt(t.comps, ['a sign "A"'], "cpu")
    kwargs = family.pipeline_prompt_kwargs(text, text)
    assert kwargs["prompt_embeds_2"].shape == kwargs["negative_prompt_embeds_2"].shape == (1, 128, 16)
    assert kwargs["prompt_embeds_mask_2"].dtype == kwargs["negative_prompt_embeds_mask"].dtype == torch.long
    pipe = t.comps.pipeline()
    assert pipe.guider is not None and pipe.ocr_guider is not None  # the base's, kept as extra parts
    assert family.guidance_kwargs(pipe, 6.0) == {}
    assert pipe.guider.guidance_scale == pipe.ocr_guider.guidance_scale == 6.0


# ------------------------------------------------------------------------------------ ComfyUI ('bfl') form
def comfy_weights(config: dict) -> dict[str, tuple[int, int]]:
    """The linear weights of ComfyUI's HunyuanImage model (its HunyuanVideo model, built from FLUX's
    DoubleStreamBlock / SingleStreamBlock: comfy/ldm/hunyuan_video/model.py) with their (out, in) shapes, written
    out from those layer definitions for this config."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = int(d * config["mlp_ratio"])
    out = {}
    for i in range(config["num_layers"]):
        for s in ("img", "txt"):
            out |= {f"double_blocks.{i}.{s}_attn.qkv": (3 * d, d), f"double_blocks.{i}.{s}_attn.proj": (d, d),
                    f"double_blocks.{i}.{s}_mlp.0": (mlp, d), f"double_blocks.{i}.{s}_mlp.2": (d, mlp),
                    f"double_blocks.{i}.{s}_mod.lin": (6 * d, d)}
    for i in range(config["num_single_layers"]):
        out |= {f"single_blocks.{i}.linear1": (3 * d + mlp, d), f"single_blocks.{i}.linear2": (d, d + mlp),
                f"single_blocks.{i}.modulation.lin": (3 * d, d)}
    return out


def test_bfl_form_names_comfys_weights_and_reloads_exactly(tmp_path, base):
    """`all_linear_mod` (every linear of every block, sd-scripts' set) exported as 'bfl': every key is
    'lora_unet_' + a ComfyUI weight name (comfy/lora.py's generic map) with down / up / alpha; up @ down * alpha /
    rank is the sum of the diffusers parts at their rows; converted back, the diffusers file is exact and
    reloads in the stock pipeline."""
    from safetensors.torch import load_file

    from finetune.export.convert import convert_lora
    from tests.qwen_families import fixed_output, load_lora

    case = CASES["hunyuanimage"]
    t = trainer(recipe(tmp_path, base, case, export={"formats": ["diffusers", "bfl"], "name": "subject"}))
    t.run()
    out = tmp_path / "out"
    comfy, ours = load_file(out / "subject_bfl.safetensors"), load_file(out / "pytorch_lora_weights.safetensors")
    shapes = comfy_weights(json.loads((base / "transformer" / "config.json").read_text()))
    stems = {k.split(".")[0] for k in comfy}
    assert stems == {"lora_unet_" + n.replace(".", "_") for n in shapes}  # every block linear, nothing else
    by_stem = {"lora_unet_" + n.replace(".", "_"): n for n in shapes}
    for s in stems:
        up, down, alpha = comfy[f"{s}.lora_up.weight"], comfy[f"{s}.lora_down.weight"], comfy[f"{s}.alpha"]
        assert (up @ down).shape == shapes[by_stem[s]]
        assert float(alpha) / down.shape[0] == 0.5  # alpha 2 over rank 4, kept when the parts are fused
    qkv = comfy["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] @ \
        comfy["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]
    for j, x in enumerate("qkv"):
        b, a = (ours[f"transformer.transformer_blocks.0.attn.to_{x}.lora_{p}.weight"] for p in "BA")
        assert torch.allclose(qkv[j * 32:(j + 1) * 32], b @ a, atol=1e-7)
    back = load_file(convert_lora(out / "subject_bfl.safetensors", tmp_path / "d", "diffusers"))
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
    pipe = stock(base)
    load_lora(pipe, tmp_path / "d")
    assert float((fixed_output(case, pipe.transformer) - fixed_output(case, t.comps.denoiser)).abs().max()) < 1e-4


def test_presets_keep_to_the_blocks(base):
    """The token refiner in front of the blocks has attention of the same names, and the transformer ends with a
    proj_out: no preset reaches them."""
    from finetune.models.families import FAMILIES

    pipe = stock(base)
    names = [n for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    for preset, targets in FAMILIES["hunyuanimage"].lora_presets.items():
        hit = [n for n in names if re.fullmatch(targets, n)]
        assert hit and all(n.startswith(("transformer_blocks.", "single_transformer_blocks.")) for n in hit), preset
    every = [n for n in names if n.startswith(("transformer_blocks.", "single_transformer_blocks."))]
    assert [n for n in names if re.fullmatch(FAMILIES["hunyuanimage"].lora_presets["all_linear_mod"], n)] == every


def test_gradient_checkpointing_gives_the_same_step(tmp_path, base):
    """HunyuanImage's transformer hands its blocks keyword arguments (attention_mask), which diffusers' own
    checkpointing function refuses (diffusers 0.42.1); ours passes them on: one step's loss and LoRA gradients
    equal the step without checkpointing."""
    grads = []
    for on in (False, True):
        t = trainer(recipe(tmp_path / str(on), base, CASES["hunyuanimage"], train={"gradient_checkpointing": on}))
        assert t.comps.denoiser.is_gradient_checkpointing == on
        t.comps.denoiser.train()
        loss, _ = t.compute_loss(next(iter(t.data.loader(0))))
        loss.backward()
        grads.append((float(loss), {n: p.grad.clone() for n, p in t.comps.denoiser.named_parameters()
                                    if p.grad is not None}))
    (a, ga), (b, gb) = grads
    assert abs(a - b) < 1e-6 and ga.keys() == gb.keys() and len(ga) > 0
    assert max(float((ga[k] - gb[k]).abs().max()) for k in ga) < 1e-6
