"""diffusers -> original checkpoint (LDM / SGM) key layout, for single-file exports that ComfyUI, AUTOMATIC1111
and diffusers' `from_single_file` open.

    model.diffusion_model.*                 U-Net: input_blocks / middle_block / output_blocks, label_emb (SDXL)
    first_stage_model.*                     VAE: encoder.down.N.block.M, decoder.up.(reversed).block.M, mid.*
    cond_stage_model.transformer.*          SD 1.x: OpenAI CLIP (transformers names with text_model.)
    cond_stage_model.model.*                SD 2.x: OpenCLIP-H (open_clip names, fused attention in_proj)
    conditioner.embedders.0.transformer.*   SDXL: CLIP-L (transformers names)
    conditioner.embedders.1.model.*         SDXL: OpenCLIP-bigG (open_clip names, text_projection)

The U-Net and VAE follow the block arithmetic of the layout (finetune.export.layouts), so any SD-shaped config
works; how the text encoders are stored is the family's table (`Family.single_file_text`).
No torch at import: the families name the text writers below.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from finetune.errors import ModelError
from finetune.export.layouts import UNetGeometry, unet_to_ldm

if TYPE_CHECKING:
    import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_state(unet) -> dict[str, torch.Tensor]:
    g = UNetGeometry.of(unet)
    return {UNET_PREFIX + unet_to_ldm(k, g): v for k, v in unet.state_dict().items()}


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


def vae_state(vae) -> dict[str, torch.Tensor]:
    levels = len(vae.config.block_out_channels)
    out = {}
    for k, v in vae.state_dict().items():
        new = vae_key(k, levels)
        if ".mid.attn_1." in new and new.endswith(".weight") and v.dim() == 2:
            v = v[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
        out[VAE_PREFIX + new] = v
    return out


def _with_text_model(key: str) -> str:
    # transformers >= 5.6 flattened CLIPTextModel (no `text_model.` level); original checkpoints keep it
    return key if key.startswith(("text_model.", "text_projection")) else f"text_model.{key}"


@dataclass(frozen=True)
class ClipCheckpoint:
    """A CLIP text encoder kept in transformers names under `prefix` (SD 1.x, SDXL's CLIP-L)."""

    prefix: str

    def state(self, encoder) -> dict[str, torch.Tensor]:
        return {self.prefix + _with_text_model(k): v for k, v in encoder.state_dict().items()
                if not k.endswith("position_ids")}


OPENCLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                  "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
OPENCLIP_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                "text_model.embeddings.position_embedding.weight": "positional_embedding",
                "text_model.final_layer_norm.weight": "ln_final.weight",
                "text_model.final_layer_norm.bias": "ln_final.bias"}


@dataclass(frozen=True)
class OpenClipCheckpoint:
    """An OpenCLIP text encoder in open_clip's names under `prefix` (SD 2.x's OpenCLIP-H, SDXL's bigG):
    q/k/v fused into `attn.in_proj_*`, the projection stored as the matrix text features are multiplied by."""

    prefix: str

    def state(self, encoder) -> dict[str, torch.Tensor]:
        import torch

        out, qkv = {}, {}
        for k, v in encoder.state_dict().items():
            k = _with_text_model(k)
            if k.endswith("position_ids"):
                continue
            if k in OPENCLIP_TOP:
                out[OPENCLIP_TOP[k]] = v
            elif k == "text_projection.weight":
                out["text_projection"] = v.T.contiguous()  # nn.Linear weight [proj, width]; open_clip: x @ P
            elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", k):
                i, module, kind = m[1], m[2], m[3]
                if qk := re.fullmatch(r"self_attn\.([qkv])_proj", module):
                    qkv.setdefault((i, kind), {})[qk[1]] = v
                elif module in OPENCLIP_LAYER:
                    out[f"transformer.resblocks.{i}.{OPENCLIP_LAYER[module]}.{kind}"] = v
                else:
                    raise ModelError(f"text encoder weight '{k}' has no place in the OpenCLIP layout")
            else:
                raise ModelError(f"text encoder weight '{k}' has no place in the OpenCLIP layout")
        for (i, kind), parts in qkv.items():
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([parts[c] for c in "qkv"], dim=0)
        return {self.prefix + k: v for k, v in out.items()}


def pipeline_to_ldm(family, unet, vae, text_encoders: dict, dtype: torch.dtype | None = None) -> dict:
    """The whole pipeline as one original-layout state dict; `text_encoders` maps names to modules."""
    missing = [n for n in family.single_file_text if n not in text_encoders]
    if missing:
        raise ModelError(f"a {family.name} single file needs text encoder(s) {missing}")
    state = unet_state(unet) | vae_state(vae)
    for name, layout in family.single_file_text.items():
        state |= layout.state(text_encoders[name])
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in state.items()}
