"""diffusers -> original Stable Diffusion (LDM) key layout, for single-file checkpoints (SD 1.x / 2.x).

    model.diffusion_model.*   U-Net: input_blocks / middle_block / output_blocks, resnets as in_layers/out_layers
    first_stage_model.*       VAE: encoder.down.N.block.M, decoder.up.(reversed).block.M, mid.block_1/attn_1
    cond_stage_model.transformer.*   CLIP text encoder (transformers names, unchanged)

Written from the block arithmetic of the layout (layers_per_block resnets per level, one more on the way
up), so it follows the base's own U-Net config rather than a table for one size.
"""

from __future__ import annotations

import re

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{UNET_RESNET.get(head, head)}.{tail}"


def unet_key(key: str, layers: int, up_has_attn: list[bool]) -> str:
    """One diffusers U-Net key in the LDM layout."""
    for old, new in UNET_TOP.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    per = layers + 1
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", key):
        i, part, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if part == "downsamplers":
            return f"input_blocks.{per * (i + 1)}.0.op.{rest.removeprefix('conv.')}"
        idx = per * i + j + 1
        return f"input_blocks.{idx}.0.{_resnet(rest)}" if part == "resnets" else f"input_blocks.{idx}.1.{rest}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        part, j, rest = m[1], int(m[2]), m[3]
        return f"middle_block.{2 * j}.{_resnet(rest)}" if part == "resnets" else f"middle_block.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", key):
        i, part, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if part == "upsamplers":
            return f"output_blocks.{per * i + layers}.{2 if up_has_attn[i] else 1}.{rest}"
        idx = per * i + j
        return f"output_blocks.{idx}.0.{_resnet(rest)}" if part == "resnets" else f"output_blocks.{idx}.1.{rest}"
    raise KeyError(f"U-Net key '{key}' has no place in the LDM layout")


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    cfg = unet.config
    up_has_attn = ["CrossAttn" in t for t in cfg.up_block_types]
    return {UNET_PREFIX + unet_key(k, cfg.layers_per_block, up_has_attn): v for k, v in unet.state_dict().items()}


def vae_key(key: str, levels: int) -> str:
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    if m := re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        side, part, j, rest = m[1], m[2], int(m[3]), m[4]
        if part == "resnets":
            return f"{side}.mid.block_{j + 1}.{rest}"
        head, _, tail = rest.rpartition(".")
        return f"{side}.mid.attn_1.{VAE_ATTN.get(head, head)}.{tail}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.(resnets|downsamplers)\.(\d+)\.(.+)", key):
        i, part, j, rest = m[1], m[2], m[3], m[4]
        return f"encoder.down.{i}.block.{j}.{rest}" if part == "resnets" else f"encoder.down.{i}.downsample.{rest}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.+)", key):
        i, part, j, rest = levels - 1 - int(m[1]), m[2], m[3], m[4]
        return f"decoder.up.{i}.block.{j}.{rest}" if part == "resnets" else f"decoder.up.{i}.upsample.{rest}"
    return key


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    levels = len(vae.config.block_out_channels)
    out = {}
    for k, v in vae.state_dict().items():
        new = vae_key(k, levels)
        if ".mid.attn_1." in new and new.endswith(".weight") and v.dim() == 2:
            v = v[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
        out[VAE_PREFIX + new] = v
    return out


def text_encoder_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    # transformers >= 5.6 flattened CLIPTextModel (no `text_model.` level); the LDM layout keeps it
    wrapped = hasattr(text_encoder, "text_model")
    return {TEXT_PREFIX + (k if wrapped else f"text_model.{k}"): v for k, v in text_encoder.state_dict().items()}


def pipeline_to_ldm(unet, vae, text_encoder, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The whole SD 1.x/2.x pipeline as one LDM state dict (SD 2's OpenCLIP is written in HF form too)."""
    state = unet_to_ldm(unet) | vae_to_ldm(vae) | text_encoder_to_ldm(text_encoder)
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in state.items()}
