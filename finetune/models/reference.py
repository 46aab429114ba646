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

# SD 2.1 (768 px, v-prediction): OpenCLIP-H text encoder, per-block head dims, linear projections
SD21_UNET = SD15_UNET | dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                             use_linear_projection=True, upcast_attention=True)
OPENCLIP_H = dict(
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
)

# SDXL base 1.0: three levels, 1/2/10 transformer layers, 2048-wide cross-attention over CLIP-L + OpenCLIP-bigG,
# 'text_time' added conditioning: 6 size/crop ids x 256 + 1280 pooled = 2816
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SDXL_VAE = SD_VAE | dict(sample_size=1024, scaling_factor=0.13025, force_upcast=True)
OPENCLIP_BIGG = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
)
SDXL_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                      steps_offset=1, timestep_spacing="leading")


# SD 3.5 Medium: an MMDiT-X of 24 joint blocks (dual attention in the first 13), 1536 wide, qk RMS-norm;
# a 16-channel VAE; CLIP-L and OpenCLIP-bigG with projections; T5-XXL (4.7B) is left out of the random base
# (the benchmark caches text embeddings, so it never reaches the GPU; SD3 takes zeros in its place)
SD35M_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
SD3_VAE = SD_VAE | dict(sample_size=1024, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                        use_quant_conv=False, use_post_quant_conv=False)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)


def build_reference_base(model: str, path: Path) -> Path:
    """Write (once) a diffusers folder of `model` ('sd15', 'sd21', 'sdxl') with random weights; return its path."""
    if (path / "model_index.json").is_file():
        return path
    builders = {"sd15": _sd15, "sd21": _sd21, "sdxl": _sdxl, "sd35m": _sd35m}
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


def _sd21():
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from finetune.toy import toy_base_path

    torch.manual_seed(0)
    return StableDiffusionPipeline(
        unet=UNet2DConditionModel(**SD21_UNET), vae=AutoencoderKL(**(SD_VAE | dict(sample_size=768))),
        text_encoder=CLIPTextModel(CLIPTextConfig(**OPENCLIP_H)),
        tokenizer=CLIPTokenizer.from_pretrained(toy_base_path() / "tokenizer", pad_token="!"),
        scheduler=DDIMScheduler(**SCHEDULER, prediction_type="v_prediction"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )


def sdxl_modules(device: str = "cpu") -> dict:
    """SDXL base's U-Net, VAE and both text encoders with random weights (`device="meta"`: shapes only)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device(device):
        return {
            "unet": UNet2DConditionModel(**SDXL_UNET), "vae": AutoencoderKL(**SDXL_VAE),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG)),
        }


def _sdxl():
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    from finetune.toy import toy_base_path

    torch.manual_seed(0)
    tokenizer = toy_base_path() / "tokenizer"
    return StableDiffusionXLPipeline(
        **sdxl_modules(), tokenizer=CLIPTokenizer.from_pretrained(tokenizer),
        tokenizer_2=CLIPTokenizer.from_pretrained(tokenizer, pad_token="!"),
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER), force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


def _sd35m():
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from finetune.toy import toy_base_path

    torch.manual_seed(0)
    tokenizer = toy_base_path() / "tokenizer"
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**SD35M_TRANSFORMER), vae=AutoencoderKL(**SD3_VAE),
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG)),
        text_encoder_3=None, tokenizer=CLIPTokenizer.from_pretrained(tokenizer),
        tokenizer_2=CLIPTokenizer.from_pretrained(tokenizer, pad_token="!"), tokenizer_3=None,
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
    )


# FLUX.1 [dev]: 19 double-stream + 38 single-stream blocks, 24 heads of 128 (3072 wide), guidance embedding;
# CLIP-L (pooled) and T5-XXL v1.1 (4096 wide, 24 layers); a 16-channel VAE (the published config.json files)
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56),
)
T5_XXL = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, dense_act_fn="gelu_new", feed_forward_proj="gated-gelu",
    is_encoder_decoder=False, tie_word_embeddings=False,
)
FLUX_VAE = SD3_VAE | dict(scaling_factor=0.3611, shift_factor=0.1159)
FLUX_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096)


def reference_modules(model: str) -> tuple[str, dict]:
    """(family name, {component: module}) of a reference architecture built on the meta device (shapes
    only, no memory): what `finetune estimate` sizes when a hub base is not in the local cache."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device("meta"):
        if model == "sd15":
            return "sd1", {
                "unet": UNet2DConditionModel(**SD15_UNET), "vae": AutoencoderKL(**SD_VAE),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L))}
        if model in ("flux-dev", "flux-schnell"):
            return "flux", {
                "transformer": FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER,
                                                      guidance_embeds=model == "flux-dev"), "vae": AutoencoderKL(**FLUX_VAE),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
                "text_encoder_2": T5EncoderModel(T5Config(**T5_XXL))}
    if model == "sdxl":
        return "sdxl", sdxl_modules("meta")
    from finetune.models.reference_wan import WAN_MODELS, wan_reference

    if model in WAN_MODELS:
        return wan_reference(model)
    raise ValueError(f"no reference architecture {model!r}; known: sd15, sdxl, flux-dev, flux-schnell, "
                     f"{', '.join(WAN_MODELS)}")


#: hub ids whose architecture `reference_modules` builds (same shapes as the published weights)
REFERENCE_IDS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15", "runwayml/stable-diffusion-v1-5": "sd15",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "black-forest-labs/FLUX.1-dev": "flux-dev", "black-forest-labs/FLUX.1-schnell": "flux-schnell",
}
from finetune.models.reference_wan import WAN_IDS  # noqa: E402 (Wan's table lives beside its configs)

REFERENCE_IDS |= WAN_IDS
