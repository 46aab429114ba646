"""The Wan-shaped toy video base: architecture, text encoder, VAE config and the diffusers folder.

Everything that fixes a shape lives here, so tests can build the same model with random weights
(`random_video_pipeline`) without training anything. Training is in `build_video_train.py`;
`tools/make_toy_model.py --video` runs both. Build-time only: the committed base loads with a stock
`WanPipeline`.

Shapes: clips of 9 frames x 64 px -> a causal video VAE, 4x in time and 4x in space -> latents
[8, 3, 16, 16] -> WanTransformer3DModel patches of (1, 2, 2): 3 x 8 x 8 = 192 tokens of 128 wide.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import torch

from finetune.export.io import replace_folder
from finetune.toy import video_world, world

LATENT_CHANNELS = 8
VAE_CONFIG = dict(base_dim=16, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 2], num_res_blocks=1,
                  temperal_downsample=[True, True], scale_factor_spatial=4, scale_factor_temporal=4)
# 4 heads of 32: Wan's rotary embedding splits a head into time (12) and two space (10 + 10) parts
TRANSFORMER_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32,
                          in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, text_dim=64, freq_dim=64,
                          ffn_dim=256, num_layers=6, rope_max_seq_len=64)
MAX_SEQUENCE_LENGTH = 16  # UMT5 tokens; toy captions are under 10, and the model is trained at exactly 16
UMT5_CONFIG = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=32,
                   relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                   is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1)
FLOW_SHIFT = 2.0  # the sampler's (and so training's) static shift: small latents need less than Wan's 3.0
SAMPLER = dict(steps=30, guidance=5.0, frames=video_world.FRAMES, size=world.SIZE)
WORDS = ("moving", "left", "right", "up", "down", "growing", "shrinking", "turning", "changing", "colour")


def tokenizer():
    """A T5-style Unigram tokenizer over every toy word (video words included); unknown words fall apart
    into characters, as UMT5 splits rare words."""
    from transformers import T5TokenizerFast

    from finetune.toy.build_flux import t5_vocabulary

    vocab = t5_vocabulary()
    known = {piece for piece, _ in vocab}
    vocab[3:3] = [(f"\u2581{w}", -4.0) for w in WORDS if f"\u2581{w}" not in known]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=MAX_SEQUENCE_LENGTH)


def text_encoder(vocab_size: int, seed: int = 0):
    """A random UMT5 encoder, frozen: it only has to map prompts to distinct states."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    return UMT5EncoderModel(UMT5Config(vocab_size=vocab_size, **UMT5_CONFIG)).eval().requires_grad_(False)


def make_vae(seed: int = 0, mean=None, std=None):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(**VAE_CONFIG, latents_mean=list(mean or [0.0] * LATENT_CHANNELS),
                            latents_std=list(std or [1.0] * LATENT_CHANNELS))


def make_transformer(seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(**TRANSFORMER_CONFIG)


def make_scheduler():
    from finetune.models.tiny import wan_sampler

    return wan_sampler(FLOW_SHIFT)


def random_video_pipeline(seed: int = 0):
    """The toy video base's exact shapes with untrained weights (plumbing tests, no learning)."""
    from diffusers import WanPipeline

    tok = tokenizer()
    return WanPipeline(tokenizer=tok, text_encoder=text_encoder(len(tok), seed), vae=make_vae(seed),
                       transformer=make_transformer(seed), scheduler=make_scheduler())


def save_video_pipeline(out: pathlib.Path, parts: dict, info: dict) -> float:
    """Write the WanPipeline folder atomically (temp folder, then rename); returns its size in MB. The
    transformer and the VAE ship in fp16 (EMA-averaged fp32 weights, rounded far below their error); the
    small UMT5 stays fp32."""
    import copy

    from diffusers import WanPipeline

    from finetune.toy.build_flux import folder_size_mb

    pipe = WanPipeline(tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"],
                       vae=copy.deepcopy(parts["vae"]).half(), transformer=copy.deepcopy(parts["transformer"]).half(),
                       scheduler=make_scheduler())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "toy_build.json").write_text(json.dumps(info, indent=2) + "\n")
    replace_folder(tmp, out)
    return folder_size_mb(out)
