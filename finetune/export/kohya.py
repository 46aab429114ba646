"""The kohya / LyCORIS key layout that ComfyUI and AUTOMATIC1111 load natively.

    lora_unet_<module path with _>.lora_down.weight / .lora_up.weight / .alpha   (LoRA, LoCon)
    ... .dora_scale                                                              (DoRA magnitude)
    ... .hada_w1_a / .hada_w1_b / .hada_w2_a / .hada_w2_b / .alpha               (LoHa)
    ... .lokr_w1 / .lokr_w2 (or their _a/_b factors) / .alpha                    (LoKr)
    lora_te_<text encoder module path with _>...                                 (text encoder)

Conventions that differ from peft, and what we do about them:
- scale: every loader multiplies by alpha / rank, where rank is the inner dimension of the factors. A LoKr
  whose two Kronecker factors are both full matrices has no rank, and ComfyUI, A1111 and LyCORIS then use a
  scale of 1: peft's alpha / r is baked into lokr_w1 on export (and read back as scale 1).
- DoRA: peft keeps the magnitude per output feature ([out] for Linear, [1, out, 1, 1] for Conv2d) and
  normalises W + dW per output row. LyCORIS' `wd_on_out` layout stores it as [out, 1, ...] (one value per
  output row, broadcasting against the weight); ComfyUI picks the output axis when dim 0 matches. We write
  [out, 1, ...] and read it back into peft's shape.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from finetune.errors import ModelError

# peft tensor name (after the module path) -> kohya/LyCORIS tensor name
PEFT_TO_KOHYA = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora_magnitude_vector": "dora_scale",
    "hada_w1_a": "hada_w1_a", "hada_w1_b": "hada_w1_b", "hada_w2_a": "hada_w2_a", "hada_w2_b": "hada_w2_b",
    "lokr_w1": "lokr_w1", "lokr_w1_a": "lokr_w1_a", "lokr_w1_b": "lokr_w1_b",
    "lokr_w2": "lokr_w2", "lokr_w2_a": "lokr_w2_a", "lokr_w2_b": "lokr_w2_b",
}
KOHYA_TO_PEFT = {v: k for k, v in PEFT_TO_KOHYA.items()}
DEFAULT_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-768-v", "sdxl": "stable-diffusion-xl-v1-base"}
# module-name parts that themselves contain '_' (diffusers U-Net and CLIP text encoder), longest first
COMPOUND = sorted(
    [
        "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
        "proj_in", "proj_out", "conv_shortcut", "time_emb_proj", "conv_in", "conv_out", "time_embedding",
        "linear_1", "linear_2", "add_embedding", "text_model", "self_attn", "q_proj", "k_proj", "v_proj",
        "out_proj", "text_projection", "final_layer_norm", "layer_norm1", "layer_norm2", "conv_norm_out",
        "add_time_proj", "attn_1", "attn_2",
    ],
    key=lambda s: -s.count("_"),
)


def _prefixes(family) -> dict[str, str]:
    return dict(getattr(family, "kohya_prefixes", None) or DEFAULT_PREFIXES)


def is_kohya(tensors: dict[str, Any]) -> bool:
    return any(k.startswith("lora_") and "." in k and "_" in k.split(".")[0] for k in tensors) and all(
        k.split(".")[0].startswith(("lora_unet", "lora_te")) for k in tensors
    )


# ------------------------------------------------------------------------------------------- writing
def layers_to_kohya(layers: dict, family=None) -> dict[str, torch.Tensor]:
    """Adapter layers ('unet.<path>' -> Layer) as kohya/LyCORIS tensors, one alpha per module."""
    prefixes = _prefixes(family)
    out: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        component, path = name.split(".", 1)
        if component not in prefixes:
            raise ModelError(f"no kohya prefix for module '{component}'")
        base = f"{prefixes[component]}_{path.replace('.', '_')}"
        tensors = dict(layer.tensors)
        dtype = next(iter(tensors.values())).dtype
        if layer.kind == "lokr" and _lokr_unranked(tensors) and layer.scale != 1.0:
            tensors["lokr_w1"] = (tensors["lokr_w1"].float() * layer.scale).to(dtype)
        for suffix, value in tensors.items():
            if suffix == "lora_magnitude_vector":
                value = _dora_to_kohya(value)
            out[f"{base}.{PEFT_TO_KOHYA[suffix]}"] = value
        out[f"{base}.alpha"] = torch.tensor(float(layer.alpha), dtype=dtype)
    return out


def peft_to_kohya(tensors: dict[str, torch.Tensor], configs: dict[str, dict], family) -> dict[str, torch.Tensor]:
    """Module-prefixed peft tensors ('unet.<path>.lora_A.weight') and their peft configs -> kohya keys."""
    from finetune.export.adapters import _peft_layers

    return layers_to_kohya(_peft_layers(tensors, configs, Path("<adapter>")), family)


def _lokr_unranked(t: dict) -> bool:
    return "lokr_w1" in t and "lokr_w2" in t


def _dora_to_kohya(m: torch.Tensor) -> torch.Tensor:
    # peft: [out] (Linear) or [1, out, 1, 1] (Conv2d); LyCORIS wd_on_out: [out, 1] / [out, 1, 1, 1]
    return m.reshape(m.numel(), *([1] * (max(m.dim(), 2) - 1)))


def _dora_to_peft(m: torch.Tensor) -> torch.Tensor:
    return m.reshape(-1) if m.dim() <= 2 else m.reshape(1, -1, *m.shape[2:])


# ------------------------------------------------------------------------------------------- reading
def kohya_module_path(stem: str) -> str:
    """'down_blocks_0_attentions_0_proj_in' -> 'down_blocks.0.attentions.0.proj_in' (diffusers names)."""
    parts, words = [], stem.split("_")
    i = 0
    while i < len(words):
        for compound in COMPOUND:
            n = compound.count("_") + 1
            if "_".join(words[i:i + n]) == compound:
                parts.append(compound)
                i += n
                break
        else:
            parts.append(words[i])
            i += 1
    return ".".join(parts)


def kohya_layers(tensors: dict[str, torch.Tensor], path: Path, family=None) -> dict:
    """kohya/LyCORIS tensors -> adapter layers keyed '<component>.<module path>'."""
    from finetune.export.adapters import Layer, kind_of, layer_rank

    by_prefix = sorted(((p, c) for c, p in _prefixes(family).items()), key=lambda pc: -len(pc[0]))
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        stem, _, suffix = key.partition(".")
        if suffix != "alpha" and suffix not in KOHYA_TO_PEFT:
            raise ModelError(f"{path}: unknown tensor '{key}' (not a LoRA/LoHa/LoKr layout we can read)")
        grouped.setdefault(stem, {})[suffix] = value
    layers = {}
    for stem, t in grouped.items():
        prefix, component = next(((p, c) for p, c in by_prefix if stem.startswith(p + "_")), (None, None))
        if prefix is None:
            raise ModelError(f"{path}: unknown key prefix in '{stem}'")
        alpha_t = t.pop("alpha", None)
        peft = {KOHYA_TO_PEFT[s]: v for s, v in t.items()}
        if "lora_magnitude_vector" in peft:
            peft["lora_magnitude_vector"] = _dora_to_peft(peft["lora_magnitude_vector"])
        kind = kind_of(peft)
        if kind == "lora" and not {"lora_A.weight", "lora_B.weight"} <= set(peft):
            raise ModelError(f"{path}: '{stem}' lacks lora_down or lora_up")
        rank = layer_rank(kind, peft)
        alpha = float(alpha_t.item()) if alpha_t is not None else float(rank or 1)
        scale = alpha / rank if rank else 1.0
        name = f"{component}.{kohya_module_path(stem[len(prefix) + 1:])}"
        layers[name] = Layer(kind, peft, alpha, rank or 0, scale)  # rank 0: LoKr of two full factors
    return layers


# ------------------------------------------------------------------------------------------ metadata
def kohya_metadata(ctx, cfg) -> dict[str, str]:
    """The ss_* keys kohya-trained files carry, and the Stability modelspec keys, that UIs read."""
    algo = cfg.adapter
    targets = cfg.targets if isinstance(cfg.targets, list) else [cfg.targets]
    conv = any(t in ("locon", "conv1", "conv2", "conv_shortcut") for t in targets)
    args: dict[str, Any] = {}
    if algo != "lora" or conv:
        args = {"algo": "locon" if algo == "lora" else algo, "conv_dim": str(cfg.rank),
                "conv_alpha": str(cfg.alpha or cfg.rank)}
    if cfg.use_dora:
        args["dora_wd"] = "True"
        args["wd_on_output"] = "True"
    meta = network_metadata(ctx, str(cfg.rank), str(cfg.alpha or cfg.rank), args)
    meta["ss_text_encoder_lr"] = str(cfg.text_encoder.lr or "") if cfg.text_encoder.enabled else ""
    meta["ss_network_train_unet_only"] = str(not cfg.text_encoder.enabled)
    return meta


def network_metadata(ctx, dim: str, alpha: str, args: dict | None = None) -> dict[str, str]:
    res = ctx.resolution
    return {
        "ss_base_model_version": BASE_VERSION.get(ctx.family, ctx.family),
        "ss_network_module": "networks.lora" if not args else "lycoris.kohya",
        "ss_network_dim": dim,
        "ss_network_alpha": alpha,
        "ss_network_args": json.dumps(args) if args else "null",
        "ss_output_name": ctx.name,
        "ss_steps": str(ctx.steps),
        "ss_max_train_steps": str(ctx.steps),
        "ss_resolution": f"({res}, {res})",
        "ss_sd_model_name": ctx.base,
        "ss_sd_model_hash": ctx.base_hash,
        "ss_tag_frequency": json.dumps({"trigger": {w: 1 for w in ctx.trigger_words}}),
        "ss_training_comment": f"trained with finetune; trigger: {', '.join(ctx.trigger_words)}",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{MODELSPEC_ARCH.get(ctx.family, ctx.family)}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": ctx.name,
        "modelspec.date": ctx.created,
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.trigger_phrase": ", ".join(ctx.trigger_words),
    }
