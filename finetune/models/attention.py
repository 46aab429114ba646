"""`model.attention`: the denoiser's attention kernel, through diffusers' attention dispatcher.

Transformers whose processors dispatch (FLUX, Qwen-Image, Z-Image, FLUX.2, Wan, ...) get the backend set on
each processor (not diffusers' process-wide active backend, so runs sharing a process do not leak into each
other). U-Nets keep torch's SDPA processor for 'sdpa' / 'native' and the plain one for 'eager'; every other
backend runs through `DispatchAttnProcessor`, the SDPA processor's computation with the dispatcher's call
in place of torch's. A family whose processors call torch directly (SD3's joint attention) takes only
'sdpa' / 'native' / 'eager'.

The recipe checks that the backend's package is installed (finetune/sections.py, PACKAGES); the trainer
checks that the device can run it (`check_device`); diffusers checks the versions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from finetune.errors import ModelError

if TYPE_CHECKING:  # the recipe reads PACKAGES: nothing here imports torch at module level
    import torch

#: recipe name -> diffusers' AttentionBackendName value
BACKENDS = {"sdpa": "native", "native": "native", "eager": "_native_math", "flash": "flash", "flash3": "_flash_3",
            "sage": "sage", "flex": "flex", "cudnn": "_native_cudnn", "xformers": "xformers"}
#: recipe name -> (module to import, what to install)
PACKAGES = {"flash": ("flash_attn", "pip install flash-attn"),
            "flash3": ("flash_attn_interface", "FlashAttention 3 (hopper/ in the flash-attention repository)"),
            "sage": ("sageattention", "pip install sageattention"),
            "xformers": ("xformers", "pip install xformers (a build matching your torch)")}
CUDA_ONLY = ("flash", "flash3", "sage", "cudnn", "xformers")


def set_attention(denoiser: torch.nn.Module, kind: str) -> None:
    from diffusers import UNet2DConditionModel

    if isinstance(denoiser, UNet2DConditionModel):
        _unet(denoiser, kind)
        return
    # every attention module's processor (Z-Image's transformer has no `attn_processors` property)
    processors = [m.processor for m in denoiser.modules() if getattr(m, "processor", None) is not None]
    dispatching = [p for p in processors if hasattr(p, "_attention_backend")]
    if len(dispatching) < len(processors):
        if kind in ("sdpa", "native"):
            return
        names = sorted({type(p).__name__ for p in processors if p not in dispatching})
        raise ModelError(f"model.attention: {kind}: this denoiser's attention ({', '.join(names)}) calls torch's "
                         "attention itself, not diffusers' dispatcher; use native")
    backend = _backend(kind)
    for p in dispatching:
        p._attention_backend = backend


def _unet(unet, kind: str) -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if kind in ("sdpa", "native", "eager"):
        unet.set_attn_processor(AttnProcessor() if kind == "eager" else AttnProcessor2_0())
        return
    unet.set_attn_processor(DispatchAttnProcessor(_backend(kind)))


def _backend(kind: str):
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _check_attention_backend_requirements,
    )

    backend = AttentionBackendName(BACKENDS[kind])
    try:
        _check_attention_backend_requirements(backend)
    except (RuntimeError, ImportError) as e:
        need = PACKAGES.get(kind, (None, "a newer torch"))[1]
        raise ModelError(f"model.attention: {kind} cannot run here ({str(e).splitlines()[0][:160]}); install "
                         f"{need}, or use native") from None
    return backend


def check_device(kind: str, device: torch.device) -> None:
    """Backends with CUDA-only kernels, on a run that is not on a CUDA device: one line, before any step."""
    import torch

    if kind in CUDA_ONLY and torch.device(device).type != "cuda":
        raise ModelError(f"model.attention: {kind} runs on NVIDIA GPUs only and this run is on "
                         f"{torch.device(device).type}; use native")


class DispatchAttnProcessor:
    """diffusers' `Attention` (the U-Nets' self- and cross-attention) with the attention itself through the
    dispatcher: the projections, norms and residual as AttnProcessor2_0 does them."""

    def __init__(self, backend):
        self._attention_backend = backend

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image = hidden_states.ndim == 4
        if image:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, length = context.shape[0], context.shape[1]
        if attention_mask is not None:  # [B, heads, 1 or L, S] as SDPA takes it
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch, -1, attn.heads, head) for x in (query, key, value))  # [B, S, H, D]
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend)
        out = attn.to_out[1](attn.to_out[0](out.reshape(batch, -1, attn.heads * head).to(query.dtype)))
        if image:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
