"""Wan's published architectures with no weights (the meta device): what `finetune estimate` sizes for a Wan hub
base that is not in the local cache. The numbers are those of the released diffusers config.json files.

- Wan 2.1 T2V 1.3B: 30 blocks of 12 heads x 128 (1536 wide), feed-forward 8960;
- Wan 2.1 T2V 14B: 40 blocks of 40 heads x 128 (5120 wide), feed-forward 13824;
- Wan 2.2 T2V A14B: two 14B experts (`transformer` above the boundary timestep 875, `transformer_2` below);
- Wan 2.2 TI2V 5B: 30 blocks of 24 heads x 128 (3072 wide), 48 latent channels from its own VAE (16x in space
  with a 2x2 patch, 4x in time);
- text: UMT5-XXL (24 layers, 4096 wide); VAE: Wan 2.1's causal video VAE (8x in space, 4x in time, 16 channels).
"""

from __future__ import annotations

WAN_BLOCK = dict(patch_size=(1, 2, 2), attention_head_dim=128, text_dim=4096, freq_dim=256, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_1_3B = WAN_BLOCK | dict(num_attention_heads=12, in_channels=16, out_channels=16, ffn_dim=8960, num_layers=30)
WAN_14B = WAN_BLOCK | dict(num_attention_heads=40, in_channels=16, out_channels=16, ffn_dim=13824, num_layers=40)
WAN_5B = WAN_BLOCK | dict(num_attention_heads=24, in_channels=48, out_channels=48, ffn_dim=14336, num_layers=30)
WAN21_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                 temperal_downsample=[False, True, True])
WAN22_VAE = dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, in_channels=12, out_channels=12,
                 temperal_downsample=[False, True, True], is_residual=True, patch_size=2, scale_factor_spatial=16,
                 latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                tie_word_embeddings=False)
#: reference name -> (transformer config, second expert?, VAE config)
WAN_MODELS = {"wan2.1-1.3b": (WAN_1_3B, False, WAN21_VAE), "wan2.1-14b": (WAN_14B, False, WAN21_VAE),
              "wan2.2-a14b": (WAN_14B, True, WAN21_VAE), "wan2.2-5b": (WAN_5B, False, WAN22_VAE)}
WAN_IDS = {"Wan-AI/Wan2.1-T2V-1.3B-Diffusers": "wan2.1-1.3b", "Wan-AI/Wan2.1-T2V-14B-Diffusers": "wan2.1-14b",
           "Wan-AI/Wan2.2-T2V-A14B-Diffusers": "wan2.2-a14b", "Wan-AI/Wan2.2-TI2V-5B-Diffusers": "wan2.2-5b"}


def wan_reference(model: str) -> tuple[str, dict]:
    """('wan', {component: meta module}) of one of WAN_MODELS."""
    import torch
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    config, two, vae = WAN_MODELS[model]
    with torch.device("meta"):
        modules = {"transformer": WanTransformer3DModel(**config), "vae": AutoencoderKLWan(**vae),
                   "text_encoder": UMT5EncoderModel(UMT5Config(**UMT5_XXL))}
        if two:
            modules["transformer_2"] = WanTransformer3DModel(**config)
    return "wan", modules
