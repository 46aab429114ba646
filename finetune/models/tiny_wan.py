"""Tiny random Wan models, built offline from configs (tests and plumbing checks: shapes and wiring, not
learning): Wan 2.1 text-to-video, Wan 2.1 image-to-video (with a CLIP image encoder) and Wan 2.2 with two
experts split at a boundary. A UMT5 encoder 32 wide over the T5-style toy tokenizer, a causal video VAE with
16 latent channels (4x in time, 8x in space) and Wan's UniPC sampler on flow sigmas (flow_shift 3.0).

    build_tiny_wan(folder, kind="t2v" | "i2v" | "experts")
"""

from __future__ import annotations

from pathlib import Path

WAN_KINDS = ("t2v", "i2v", "experts")


def tiny_wan_transformer(in_channels: int = 16, image_dim: int | None = None, layers: int = 2):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=in_channels, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=layers, rope_max_seq_len=32, image_dim=image_dim,
        added_kv_proj_dim=24 if image_dim else None)


def tiny_wan_vae():
    from diffusers import AutoencoderKLWan

    # latents_mean / latents_std: Wan's own 16 per-channel statistics (the config's defaults)
    return AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True])


def wan_sampler(flow_shift: float = 3.0):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift,
                                   num_train_timesteps=1000)


def umt5_encoder(vocab: int, width: int = 32):
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(vocab_size=vocab, d_model=width, d_kv=8, d_ff=2 * width, num_layers=2,
                                       num_heads=2, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                                       is_encoder_decoder=False))


def _clip_image_parts():
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, projection_dim=16, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=32, intermediate_size=32,
                                               patch_size=8))
    return {"image_encoder": encoder, "image_processor": CLIPImageProcessor(crop_size=32, size=32)}


def build_tiny_wan(folder: Path, kind: str = "t2v", seed: int = 0, boundary_ratio: float = 0.875) -> Path:
    """A WanPipeline ('t2v', 'experts': Wan 2.2's two experts at `boundary_ratio`) or WanImageToVideoPipeline
    ('i2v', Wan 2.1's: CLIP image encoder, 36 input channels) folder."""
    import shutil

    import torch
    from diffusers import WanImageToVideoPipeline, WanPipeline

    from finetune.models.tiny import t5_tokenizer

    if kind not in WAN_KINDS:
        raise ValueError(f"kind must be one of {WAN_KINDS}")
    folder = Path(folder)
    torch.manual_seed(seed)
    tok = t5_tokenizer(folder / "_tokenizer")
    parts = dict(tokenizer=tok, text_encoder=umt5_encoder(len(tok)), vae=tiny_wan_vae(), scheduler=wan_sampler())
    if kind == "i2v":
        image = _clip_image_parts()
        parts |= image
        pipe = WanImageToVideoPipeline(transformer=tiny_wan_transformer(36, image["image_encoder"].config.hidden_size),
                                       **parts)
    elif kind == "experts":
        pipe = WanPipeline(transformer=tiny_wan_transformer(), transformer_2=tiny_wan_transformer(),
                           boundary_ratio=boundary_ratio, **parts)
    else:
        pipe = WanPipeline(transformer=tiny_wan_transformer(), **parts)
    pipe.save_pretrained(folder)
    shutil.rmtree(folder / "_tokenizer")
    return folder
