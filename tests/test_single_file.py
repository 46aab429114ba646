"""Single-file checkpoints for sd1, sd2 and sdxl: the original layouts the UIs read (SD 2.x and SDXL's OpenCLIP
in open_clip names, SDXL's encoders under conditioner.embedders.*, label_emb), reloaded by the family's
`from_single_file` with the exported folder's configs; `tools/merge.py fuse --single-file` on SDXL."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.export.context import ExportContext
from finetune.models.families import FAMILIES
from tests.helpers import _tiny_vae, build_tiny_sd, build_tiny_sd2, load_comps, tokenizer_dir


def build_tiny_sdxl_two_widths(path: Path, w1: int = 32, w2: int = 48) -> Path:
    """A tiny SDXL whose two text encoders differ in width, as the real ones do (768 / 1280): diffusers'
    single-file loader tells CLIP-L from OpenCLIP-bigG by that width."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=w1 + w2, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
        use_linear_projection=True, norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + w2,
    )
    tok = CLIPTokenizer.from_pretrained(tokenizer_dir())

    def clip(width: int, **extra):
        return CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=width, intermediate_size=2 * width,
                              num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                              projection_dim=width, **extra)

    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    StableDiffusionXLPipeline(
        unet=unet, vae=_tiny_vae(scaling_factor=0.13025, force_upcast=True), text_encoder=CLIPTextModel(clip(w1)),
        text_encoder_2=CLIPTextModelWithProjection(clip(w2, hidden_act="gelu")), tokenizer=tok, tokenizer_2=tok,
        scheduler=sched, force_zeros_for_empty_prompt=True, add_watermarker=False,
    ).save_pretrained(path)
    return path


BUILDERS = {"sd1": build_tiny_sd, "sd2": build_tiny_sd2, "sdxl": build_tiny_sdxl_two_widths}
# the original-checkpoint names each family's UIs read, with the shapes they must have (w: text width)
LAYOUTS = {
    "sd1": {"cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (32, 32),
            "cond_stage_model.transformer.text_model.final_layer_norm.weight": (32,),
            "model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3),
            "first_stage_model.decoder.mid.attn_1.q.weight": (32, 32, 1, 1)},
    "sd2": {"cond_stage_model.model.token_embedding.weight": (49408, 32),
            "cond_stage_model.model.positional_embedding": (77, 32),
            "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (96, 32),
            "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_bias": (96,),
            "cond_stage_model.model.transformer.resblocks.0.attn.out_proj.weight": (32, 32),
            "cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight": (64, 32),
            "cond_stage_model.model.transformer.resblocks.0.ln_2.bias": (32,),
            "cond_stage_model.model.ln_final.weight": (32,)},
    "sdxl": {"conditioner.embedders.0.transformer.text_model.encoder.layers.1.mlp.fc2.weight": (32, 64),
             "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight": (144, 48),
             "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_proj.weight": (48, 96),
             "conditioner.embedders.1.model.text_projection": (48, 48),
             "conditioner.embedders.1.model.positional_embedding": (77, 48),
             "model.diffusion_model.label_emb.0.0.weight": (128, 96),
             "model.diffusion_model.output_blocks.1.2.conv.weight": (64, 64, 3, 3)},
}
PREFIXES = {"sd1": {"model.diffusion_model", "first_stage_model", "cond_stage_model.transformer"},
            "sd2": {"model.diffusion_model", "first_stage_model", "cond_stage_model.model"},
            "sdxl": {"model.diffusion_model", "first_stage_model", "conditioner.embedders.0.transformer",
                     "conditioner.embedders.1.model"}}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def exported(request, tmp_path_factory):
    """A 'trained' (perturbed) model of each family exported as diffusers folder + single file."""
    from finetune.export.full import export_full

    family = request.param
    root = tmp_path_factory.mktemp(f"single_{family}")
    comps = load_comps(BUILDERS[family](root / "base"))
    with torch.no_grad():
        comps.unet.conv_in.weight.add_(0.05)
        comps.text_encoders[-1].get_input_embeddings().weight.mul_(1.1)
    ctx = ExportContext(name="db", recipe={}, method="full", family=family, base="tiny", base_hash="0", steps=1,
                        resolution=64, dataset_fingerprint="f", formats=("diffusers", "single_file"),
                        model_card=False, prediction_type=comps.prediction_type)
    export_full(comps, root / "out", ctx)
    return family, comps, root / "out"


def test_single_file_has_the_original_layout(exported):
    from safetensors import safe_open

    from finetune.models.detect import family_of_checkpoint

    family, comps, out = exported
    with safe_open(str(out / "db.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        meta = f.metadata()
    prefixes = PREFIXES[family]
    assert [k for k in shapes if not k.startswith(tuple(f"{p}." for p in prefixes))] == []
    assert {p for p in prefixes if any(k.startswith(f"{p}.") for k in shapes)} == prefixes
    assert {k: shapes.get(k) for k in LAYOUTS[family]} == LAYOUTS[family]
    assert not [k for k in shapes if ".q_proj" in k and (".model." in k)]  # OpenCLIP: q/k/v fused, never split
    assert family_of_checkpoint(out / "db.safetensors").name == family
    arch = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-768-v", "sdxl": "stable-diffusion-xl-v1-base"}
    assert meta["modelspec.architecture"] == arch[family]
    if family == "sdxl":  # open_clip multiplies by the projection: it is the transposed nn.Linear weight
        want = comps.text_encoders[1].text_projection.weight.T
        with safe_open(str(out / "db.safetensors"), "pt") as f:
            assert torch.equal(f.get_tensor("conditioner.embedders.1.model.text_projection"), want)


def test_single_file_reloads_in_the_family_pipeline(exported):
    import diffusers

    family, comps, out = exported
    cls = getattr(diffusers, FAMILIES[family].pipeline_class)
    kwargs = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    single = cls.from_single_file(str(out / "db.safetensors"), config=str(out / "model"), **kwargs)
    folder = cls.from_pretrained(str(out / "model"), **kwargs)
    for name in ["unet", "vae", *FAMILIES[family].text_encoder_names]:
        mine, theirs = getattr(folder, name).state_dict(), getattr(single, name).state_dict()
        assert set(mine) == set(theirs), name
        assert max((mine[k] - theirs[k]).abs().max().item() for k in mine) < 1e-5, name
    trained = comps.named_modules()
    assert torch.equal(folder.unet.conv_in.weight, trained["unet"].conv_in.weight)


def test_merge_fuse_writes_an_sdxl_single_file(tmp_path, tiny_sdxl_base):
    """Fusing a LoRA into SDXL and writing a single file (it used to end in a raw KeyError on add_embedding)."""
    from safetensors import safe_open

    from finetune.export.lora import export_lora
    from tests.helpers import adapted, make_ctx
    from tests.test_tools_export import run_tool

    comps, method = adapted(tiny_sdxl_base, rank=2, alpha=2.0, targets=["to_q", "conv1"])
    export_lora(comps, method, tmp_path / "lora", make_ctx("l", formats=("kohya",)))
    single = tmp_path / "merged.safetensors"
    assert run_tool("merge", "fuse", "--base", tiny_sdxl_base, "--lora", tmp_path / "lora" / "l.safetensors",
                    "--single-file", single) == 0
    with safe_open(str(single), "pt") as f:
        keys = set(f.keys())
        fused = f.get_tensor("model.diffusion_model.input_blocks.1.0.in_layers.2.weight")
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert any(k.startswith("conditioner.embedders.1.model.transformer.resblocks.") for k in keys)
    assert torch.allclose(fused, comps.unet.down_blocks[0].resnets[0].conv1.get_base_layer().weight
                          + comps.unet.down_blocks[0].resnets[0].conv1.get_delta_weight("default"), atol=1e-6)


def test_a_module_outside_the_layout_is_one_line(tiny_base):
    from finetune.errors import ModelError
    from finetune.export.layouts import UNetGeometry, unet_to_ldm

    with pytest.raises(ModelError, match="U-Net module 'extra_head.proj' has no place in the original"):
        unet_to_ldm("extra_head.proj", UNetGeometry())
