"""Lumina 2's original Next-DiT layout for LoRA files: the names ComfyUI's Lumina2 model has for its weights
(`layers.0.attention.qkv`, `attention.out`, `feed_forward.w1..w3`, `adaLN_modulation.1`) as 'lora_unet_<name>'
keys, which comfy/lora.py maps for every weight of every model (`lora_unet_` + the weight's name), and which
sd-scripts' Lumina 2 LoRAs use.

Next-DiT fuses q, k and v into one `attention.qkv` linear of d + 2 kv rows (kv = d / 3 in Lumina 2: 8 key/value
heads of 24). LoRAs on diffusers' separate `to_q` / `to_k` / `to_v` are written fused, exactly, as FLUX's BFL form
is (finetune/models/families/flux_bfl.py `_fuse`): the downs stacked, each up a diagonal block at its part's rows.
Reading splits them back: the fused up's rows by part, the columns each part uses. Plain LoRA only (LoHa, LoKr and
DoRA have no exact fused form; the export refuses them for this format before training, as for 'bfl').
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from finetune.errors import ModelError
from finetune.export.layouts import unflatten
from finetune.models.families.flux_bfl import Part, _fuse

if TYPE_CHECKING:
    import torch

FORMAT = "nextdit"  # the export format name (export.formats, tools/convert.py --to)
PREFIX = "lora_unet"
QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
RENAMES = {"attn.to_out.0": "attention.out", "feed_forward.linear_1": "feed_forward.w1",
           "feed_forward.linear_2": "feed_forward.w2", "feed_forward.linear_3": "feed_forward.w3",
           "norm1.linear": "adaLN_modulation.1"}
WORDS = ("noise_refiner", "context_refiner", "feed_forward", "adaLN_modulation")
BLOCKS = ("layers", "noise_refiner", "context_refiner")


def _block_and_tail(module: str) -> tuple[str, str]:
    parts = module.split(".")
    if parts[0] not in BLOCKS or len(parts) < 3:
        raise KeyError(module)
    return ".".join(parts[:2]), ".".join(parts[2:])


def kv_rows(parts: dict[str, object], d: int) -> int:
    """Rows of the keys (= the values): from a trained to_k / to_v, else Lumina 2's d / 3 (8 of 24 heads)."""
    for tail in ("attn.to_k", "attn.to_v"):
        if tail in parts:
            return int(parts[tail].tensors["lora_B.weight"].shape[0])
    return d // 3


# ------------------------------------------------------------------------------------------- writing
def write(layers: dict, names: dict, where: str) -> dict[str, torch.Tensor]:
    """'transformer.<module>' LoRA layers -> Next-DiT-named tensors, q/k/v fused per block."""
    import torch

    fused: dict[str, dict[str, object]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        component, module = name.split(".", 1)
        if component != "transformer":
            raise ModelError(f"{where}: the Next-DiT form holds the transformer only ('{name}')")
        if layer.kind != "lora" or layer.dora:
            raise ModelError(f"{where}: the Next-DiT form fuses q/k/v and holds plain LoRA only; '{module}' is "
                             f"{'DoRA' if layer.dora else layer.kind}: use the diffusers file")
        try:
            block, tail = _block_and_tail(module)
        except KeyError:
            raise ModelError(f"{where}: '{module}' has no place in Lumina 2's Next-DiT layout") from None
        if tail in QKV:
            fused.setdefault(block, {})[tail] = layer
            continue
        if tail not in RENAMES:
            raise ModelError(f"{where}: '{module}' has no place in Lumina 2's Next-DiT layout")
        key = f"{PREFIX}_{block}.{RENAMES[tail]}".replace(".", "_")
        a, b = layer.tensors["lora_A.weight"], layer.tensors["lora_B.weight"]
        out |= {f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b,
                f"{key}.alpha": torch.tensor(float(layer.scale * a.shape[0]))}
    for block, parts in fused.items():
        d = int(next(iter(parts.values())).tensors["lora_A.weight"].shape[1])
        kv = kv_rows(parts, d)
        offsets = {"attn.to_q": (0, d), "attn.to_k": (d, kv), "attn.to_v": (d + kv, kv)}
        placed = sorted(((Part(t, *offsets[t]), layer) for t, layer in parts.items()), key=lambda p: p[0].offset)
        down, up, alpha = _fuse(placed, total=d + 2 * kv)
        key = f"{PREFIX}_{block}.attention.qkv".replace(".", "_")
        out |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)}
    return out


# ------------------------------------------------------------------------------------------- reading
def detect(tensors) -> bool:
    return any(k.startswith(f"{PREFIX}_") and ("_attention_qkv." in k or "_attention_out." in k
                                               or "_feed_forward_w" in k) for k in tensors)


def read(tensors: dict[str, torch.Tensor], names: dict, where) -> dict:
    """A Next-DiT-named file -> adapter layers ('transformer.<diffusers module>'), q/k/v split exactly."""
    from finetune.export.layers import Layer

    back = {v: k for k, v in RENAMES.items()}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        stem, _, suffix = key.partition(".")
        if not stem.startswith(f"{PREFIX}_"):
            raise ModelError(f"{where}: '{key}' is not a Next-DiT LoRA key")
        grouped.setdefault(unflatten(stem[len(PREFIX) + 1:], WORDS), {})[suffix] = value
    layers = {}
    for native, t in grouped.items():
        if "lora_down.weight" not in t or "lora_up.weight" not in t:
            raise ModelError(f"{where}: '{native}' lacks lora_down/lora_up (not a plain LoRA, or a truncated file)")
        kind, index, tail = native.split(".", 2)
        block = f"{kind}.{index}"
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        scale = float(t["alpha"].item()) / down.shape[0] if "alpha" in t else 1.0
        if tail != "attention.qkv":
            if tail not in back:
                raise ModelError(f"{where}: '{native}' names no linear of Lumina 2's Next-DiT layout")
            layers[f"transformer.{block}.{back[tail]}"] = _layer(Layer, down, up, scale * down.shape[0])
            continue
        d = down.shape[1]
        kv = (up.shape[0] - d) // 2
        for name, lo, rows in (("attn.to_q", 0, d), ("attn.to_k", d, kv), ("attn.to_v", d + kv, kv)):
            part = up[lo: lo + rows]
            used = part.abs().sum(dim=0).nonzero().flatten()
            if used.numel() == 0:
                continue  # this part was not adapted
            first, last = int(used.min()), int(used.max()) + 1
            if int(used.numel()) != last - first:
                first, last = 0, down.shape[0]  # a genuinely fused LoRA: every part shares the whole rank
            layers[f"transformer.{block}.{name}"] = _layer(Layer, down[first:last], part[:, first:last],
                                                           scale * (last - first))
    return layers


def _layer(cls, down, up, alpha: float):
    rank = int(down.shape[0])
    return cls("lora", {"lora_A.weight": down.contiguous(), "lora_B.weight": up.contiguous()}, alpha=float(alpha),
               rank=rank, scale=float(alpha) / rank)
