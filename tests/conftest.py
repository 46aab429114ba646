"""Shared fixtures: tests never touch the network, and build or use small models."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def tokenizer_dir() -> Path:
    from finetune.toy import toy_base_path

    return toy_base_path() / "tokenizer"


def build_tiny_sd(path: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """A random, very small SD-1-shaped pipeline (plumbing tests that need no learning)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), latent_channels=4,
        norm_num_groups=8, sample_size=32,
    )
    tok = CLIPTokenizer.from_pretrained(tokenizer_dir())
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
    ))
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=te, tokenizer=tok, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny") / "sd")


def draw_images(folder: Path, n: int = 6, caption: str = "a sks circle", size: int = 64) -> Path:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", (size, size), "white")
        ImageDraw.Draw(im).ellipse([8 + i, 8, size - 12, size - 10 + i % 3], fill=(200, 30 + 10 * i, 30))
        im.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    return folder


@pytest.fixture()
def images(tmp_path) -> Path:
    return draw_images(tmp_path / "images")


def write_recipe(tmp_path: Path, base: Path | str, images: Path, **sections) -> Path:
    """A small LoRA recipe over `images`; `sections` deep-update it (train={"max_steps": 3}, ...)."""
    from finetune.recipe import deep_merge

    data = {
        "model": {"base": str(base)},
        "data": {"sources": [{"type": "folder", "path": str(images)}], "resolution": 64,
                 "buckets": {"enabled": False}},
        "method": {"name": "lora", "rank": 4, "alpha": 2, "targets": "attention_ff"},
        "train": {"output_dir": str(tmp_path / "out"), "max_steps": 4, "batch_size": 2, "lr": 1e-3,
                  "checkpoint_every": 0, "seed": 1},
        "validation": {"prompts": [], "at_start": False},
        "export": {"formats": ["diffusers"], "model_card": False},
        "logging": {"report_to": [], "progress": False},
    }
    data = deep_merge(data, sections)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _tiny_vae(**extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), latent_channels=4,
        norm_num_groups=8, sample_size=32, **extra,
    )


def _tiny_clip_config(vocab_size: int, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, projection_dim=32, **extra)


def build_tiny_sd2(path: Path, prediction_type: str = "v_prediction", seed: int = 0) -> Path:
    """A random, very small SD-2-shaped pipeline: OpenCLIP-style text encoder (gelu, what detects SD 2.x
    in a tiny base), linear transformer projections, per-block head dims, a v-prediction scheduler."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
    )
    tok = CLIPTokenizer.from_pretrained(tokenizer_dir())
    te = CLIPTextModel(_tiny_clip_config(tok.vocab_size, hidden_act="gelu"))
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                          prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=_tiny_vae(), text_encoder=te, tokenizer=tok, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def build_tiny_sdxl(path: Path, seed: int = 0) -> Path:
    """A random, very small SDXL-shaped pipeline: two text encoders (the second with a projection),
    cross-attention over both (32 + 32 = 64), 'text_time' added conditioning (6 size/crop ids x 8 + 32
    pooled = 80), an fp16-unsafe VAE (force_upcast) and SDXL's Euler scheduler."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
        use_linear_projection=True, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
    )
    tok = CLIPTokenizer.from_pretrained(tokenizer_dir())
    te = CLIPTextModel(_tiny_clip_config(tok.vocab_size))
    te2 = CLIPTextModelWithProjection(_tiny_clip_config(tok.vocab_size, hidden_act="gelu"))
    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=_tiny_vae(scaling_factor=0.13025, force_upcast=True), text_encoder=te, text_encoder_2=te2,
        tokenizer=tok, tokenizer_2=tok, scheduler=sched, force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_sd2_base(tmp_path_factory) -> Path:
    return build_tiny_sd2(tmp_path_factory.mktemp("tiny") / "sd2v")


@pytest.fixture(scope="session")
def tiny_sdxl_base(tmp_path_factory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny") / "sdxl")
