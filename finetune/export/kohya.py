"""The kohya / LyCORIS key layout that ComfyUI and AUTOMATIC1111 load natively.

    lora_unet_<module path with _>.lora_down.weight / .lora_up.weight / .alpha   (LoRA, LoCon)
    ... .dora_scale                                                              (DoRA magnitude)
    ... .hada_w1_a / .hada_w1_b / .hada_w2_a / .hada_w2_b / .alpha               (LoHa)
    ... .lokr_w1 / .lokr_w2 (or their _a/_b factors) / .alpha                    (LoKr)
    lora_te_<text encoder module path with _>...                                 (text encoder)
"""

from __future__ import annotations

import json
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
BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-768-v", "sdxl": "stable-diffusion-xl-v1-base"}


def _split(key: str) -> tuple[str, str]:
    """'down_blocks.0.attn1.to_q.lora_A.weight' -> ('down_blocks.0.attn1.to_q', 'lora_A.weight')."""
    for suffix in sorted(PEFT_TO_KOHYA, key=len, reverse=True):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    raise ModelError(f"adapter tensor '{key}' has a layout the kohya exporter does not know")


def peft_to_kohya(tensors: dict[str, torch.Tensor], configs: dict[str, dict], family) -> dict[str, torch.Tensor]:
    """Module-prefixed peft tensors ('unet.<path>.lora_A.weight') -> kohya keys, with one alpha per module."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        module_name, rest = key.split(".", 1)
        prefix = family.kohya_prefixes.get(module_name)
        if prefix is None:
            raise ModelError(f"no kohya prefix for module '{module_name}' in family {family.name}")
        path, suffix = _split(rest)
        base = f"{prefix}_{path.replace('.', '_')}"
        if suffix == "lora_magnitude_vector":
            value = _dora_scale(value)
        out[f"{base}.{PEFT_TO_KOHYA[suffix]}"] = value
        cfg = configs[module_name]
        alpha = cfg.get("lora_alpha", cfg.get("alpha"))
        alpha = (cfg.get("alpha_pattern") or {}).get(path, alpha)
        out[f"{base}.alpha"] = torch.tensor(float(alpha), dtype=value.dtype)
    return out


def _dora_scale(magnitude: torch.Tensor) -> torch.Tensor:
    # peft keeps one magnitude per output feature ([out]); LyCORIS stores it as [out, 1] (per output row)
    return magnitude.reshape(-1, 1)


def kohya_metadata(ctx, cfg) -> dict[str, str]:
    """The ss_* keys kohya-trained files carry, and the Stability modelspec keys, that UIs read."""
    algo = cfg.adapter
    conv = any(t in ("conv1", "conv2", "conv_shortcut") for t in cfg.unet_targets())
    args: dict[str, Any] = {}
    if algo != "lora" or conv:
        args = {"algo": "locon" if algo == "lora" else algo, "conv_dim": str(cfg.rank),
                "conv_alpha": str(cfg.alpha or cfg.rank)}
    if cfg.use_dora:
        args["dora_wd"] = "True"
    res = ctx.resolution
    return {
        "ss_base_model_version": BASE_VERSION.get(ctx.family, ctx.family),
        "ss_network_module": "networks.lora" if not args else "lycoris.kohya",
        "ss_network_dim": str(cfg.rank),
        "ss_network_alpha": str(cfg.alpha or cfg.rank),
        "ss_network_args": json.dumps(args) if args else "null",
        "ss_output_name": ctx.name,
        "ss_steps": str(ctx.steps),
        "ss_resolution": f"({res}, {res})",
        "ss_sd_model_name": ctx.base,
        "ss_training_comment": f"trained with finetune; trigger: {', '.join(ctx.trigger_words)}",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{MODELSPEC_ARCH.get(ctx.family, ctx.family)}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": ctx.name,
        "modelspec.date": ctx.created,
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.trigger_phrase": ", ".join(ctx.trigger_words),
    }
