"""Quantized frozen weights (QLoRA): `model.quantize` for the denoiser, `model.quantize_text_encoders` for the
text encoders.

- `nf4`: bitsandbytes 4-bit NormalFloat with double-quantized block scales (QLoRA's format), ~0.52 bytes
  per weight; `int8`: bitsandbytes LLM.int8 (threshold 6.0), ~1 byte per weight. peft wraps both with its
  bitsandbytes LoRA layers, exactly as after loading with diffusers' / transformers' `BitsAndBytesConfig`.
- `fp8`: the weight stored as float8 e4m3 and upcast to the compute dtype for each layer's forward
  (diffusers' layerwise casting, what kohya's `--fp8_base` does): 1 byte per weight, any hardware, no fp8
  matmuls. torchao's fp8 tensors are not used: peft's torchao LoRA layer takes int8 weights only.

Why we quantize loaded modules here instead of passing `BitsAndBytesConfig` to `from_pretrained`: diffusers'
quantizer refuses to run without CUDA, so that path could never be tested on the CPU, while bitsandbytes
itself quantizes and runs on the CPU. This one path serves both: it builds the same `bnb.nn.Linear4bit` /
`Linear8bitLt` layers with the same options, skips the modules the libraries' quantizers skip (diffusers'
and transformers' `_keep_in_fp32_modules`, transformers' `get_keys_to_not_convert`), sets the
`is_loaded_in_4bit` / `is_loaded_in_8bit` flags peft and accelerate read, and quantizes each layer on the
accelerator (fast there) as it goes. The cost, stated in docs/memory.md: host RAM while loading holds the
frozen model in the compute dtype (FLUX.1-dev: 23.8 GB in bf16) where diffusers' loader would stream it
shard by shard.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from finetune.errors import ModelError

KINDS = ("nf4", "int8", "fp8")
FP8 = torch.float8_e4m3fn
INT8_THRESHOLD = 6.0  # LLM.int8's outlier threshold (diffusers' and transformers' default)


def skip_names(module: torch.nn.Module) -> list[str]:
    """Module names the libraries' own quantizers keep unquantized in this model."""
    names = list(getattr(module, "_keep_in_fp32_modules", None) or [])
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a core dependency
        return names
    if isinstance(module, PreTrainedModel):
        from transformers.quantizers.base import get_keys_to_not_convert

        names += get_keys_to_not_convert(module)
    return sorted(set(names))


def quantizable(module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Linear]]:
    """(path, layer) of every frozen linear layer a quantizer converts: what the libraries convert (every
    `nn.Linear` outside the skipped names), already-wrapped peft layers excluded."""
    skip = skip_names(module)
    for path, sub in module.named_modules():
        if type(sub) is not torch.nn.Linear or _skipped(path, skip):
            continue
        if any(p.requires_grad for p in sub.parameters()):
            continue
        yield path, sub


def _skipped(path: str, names: list[str]) -> bool:
    # the libraries match a name as a whole path component sequence ('wo' skips every T5 '...DenseReluDense.wo')
    dotted = f".{path}."
    return any(f".{n}." in dotted for n in names)


def quantize_module(module: torch.nn.Module, kind: str, compute_dtype: torch.dtype, device: Any = None,
                    what: str = "model.quantize") -> int:
    """Convert `module`'s frozen linear layers in place; returns how many. nf4 / int8 layers hold their weights
    in the compute dtype until they move to a device (`module.to(device)`): bitsandbytes quantizes them
    there, as after loading with a `BitsAndBytesConfig`, so a CUDA run quantizes on the GPU in seconds
    (not on the CPU in minutes) and the quantized weights never share the card with what runs before
    the denoiser is placed (text and latent caching). `device` quantizes right away."""
    if kind not in KINDS:
        raise ValueError(f"unknown quantization {kind!r}; known: {', '.join(KINDS)}")
    paths = [path for path, _ in quantizable(module)]
    if kind == "fp8":
        from diffusers.hooks.layerwise_casting import apply_layerwise_casting_hook

        for path in paths:
            apply_layerwise_casting_hook(module.get_submodule(path), FP8, compute_dtype, non_blocking=False)
        module._finetune_quantized = kind
        return len(paths)
    bnb = _bitsandbytes(what, kind)
    for path in paths:  # one layer at a time: its full-precision weight is freed as the next one starts
        parent, name = _parent(module, path)
        setattr(parent, name, _bnb_layer(bnb, getattr(parent, name), kind, compute_dtype, device))
    module.is_loaded_in_4bit = kind == "nf4"  # what peft dispatches its bitsandbytes LoRA layers on
    module.is_loaded_in_8bit = kind == "int8"
    module._finetune_quantized = kind
    return len(paths)


def _bitsandbytes(what: str, kind: str):
    try:
        import logging

        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional CPU kernels it cannot find
        import bitsandbytes as bnb
    except Exception as e:  # noqa: BLE001 - bitsandbytes fails in many ways on unsupported machines
        raise ModelError(f"{what}: {kind} needs bitsandbytes, which failed to load ({e}); use fp8 or none") from None
    return bnb


def _parent(module: torch.nn.Module, path: str) -> tuple[torch.nn.Module, str]:
    head, _, name = path.rpartition(".")
    return (module.get_submodule(head) if head else module), name


def _bnb_layer(bnb, layer: torch.nn.Linear, kind: str, compute_dtype: torch.dtype, device):
    weight = layer.weight.data.to(compute_dtype)
    bias = layer.bias
    with torch.device("meta"):  # no throw-away full-precision weight for the new layer
        if kind == "nf4":
            new = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias is not None, compute_dtype,
                                    compress_statistics=True, quant_type="nf4")
        else:
            new = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias is not None,
                                      has_fp16_weights=False, threshold=INT8_THRESHOLD)
    if kind == "nf4":
        new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True,
                                       module=new)
    else:
        new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if bias is not None:
        new.bias = torch.nn.Parameter(bias.data.to(compute_dtype), requires_grad=False)
    new.source_cls = torch.nn.Linear  # as diffusers' replacement records it
    new.requires_grad_(False)
    return new if device is None else new.to(device)  # bitsandbytes quantizes on a move to a device


def quantized_bytes(kind: str, shape) -> int:
    """Bytes a linear weight of `shape` takes stored as `kind` (checked against bitsandbytes' own tensors in
    tests/test_memory.py): nf4 packs two weights a byte, plus a uint8 scale per block of 64 (double
    quantization) and a float32 scale per 256 of those; int8 one byte a weight plus a float32 scale per
    output row; fp8 one byte."""
    n = math.prod(shape)
    if kind == "nf4":
        return (n + 1) // 2 + math.ceil(n / 64) + 4 * math.ceil(n / 64 / 256) + 1092  # + code tables
    if kind == "int8":
        return n + 4 * shape[0]
    if kind == "fp8":
        return n
    raise ValueError(f"unknown quantization {kind!r}; known: {', '.join(KINDS)}")


def quantized_kind(module: torch.nn.Module) -> str | None:
    """'nf4' / 'int8' / 'fp8' for a module quantized here, else None."""
    return getattr(module, "_finetune_quantized", None)


def is_stored_quantized(p: torch.Tensor) -> bool:
    """A weight held in a quantized form (bitsandbytes' packed bytes, fp8 storage): never cast it."""
    return p.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
