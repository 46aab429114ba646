"""Real architectures with random weights, built from their public configs (for benchmarks: timing and
memory need the shapes, not trained weights, and nothing can be downloaded).

The tokenizer is the CLIP BPE tokenizer shipped with the toy base (the same vocabulary SD uses).
"""

from __future__ import annotations

from pathlib import Path

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
)
CLIP_L = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def build_reference_base(model: str, path: Path) -> Path:
    """Write (once) a diffusers folder of `model` ('sd15') with random weights; return its path."""
    if (path / "model_index.json").is_file():
        return path
    builders = {"sd15": _sd15}
    if model not in builders:
        raise ValueError(f"no reference config for {model!r}; known: {sorted(builders)}")
    pipe = builders[model]()
    tmp = path.with_name(path.name + ".tmp")
    pipe.save_pretrained(tmp)
    tmp.rename(path)
    return path


def _sd15():
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from finetune.toy import toy_base_path

    torch.manual_seed(0)
    return StableDiffusionPipeline(
        unet=UNet2DConditionModel(**SD15_UNET), vae=AutoencoderKL(**SD_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L)),
        tokenizer=CLIPTokenizer.from_pretrained(toy_base_path() / "tokenizer"),
        scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
