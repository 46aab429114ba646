"""Which frozen weights stay fp32 when everything else is cast to the compute dtype: the ones transformers and
diffusers themselves keep in fp32 when a model loads in that dtype (`_keep_in_fp32_modules`), so our casts
leave a base exactly as the stock pipeline has it (T5 v1.1's feed-forward output `wo` overflows in fp16:
NaN captions). Used by the trainer's cast (`components.cast_frozen`) and by `finetune estimate`.
"""

from __future__ import annotations

import re

import torch


def kept_in_fp32(module: torch.nn.Module, dtype: torch.dtype) -> set[int]:
    """ids of the parameters transformers / diffusers keep in fp32 when `module` loads in `dtype`, by their
    own rules: transformers' `_keep_in_fp32_modules` in fp16 (T5 v1.1's `wo`, whose activations overflow fp16)
    and `_keep_in_fp32_modules_strict` in fp16 and bf16, matched as a search in the parameter name;
    diffusers' `_keep_in_fp32_modules` in any dtype, matched against the name's dotted parts."""
    kept: set[int] = set()
    if dtype == torch.float32:
        return kept
    for _, owner in module.named_modules():
        patterns, by_part = _fp32_rules(owner, dtype)
        for name, p in owner.named_parameters() if patterns else ():
            parts = name.split(".")
            if any(x in parts if by_part else re.search(x.replace("*", ".*"), name) for x in patterns):
                kept.add(id(p))
    return kept


def _fp32_rules(owner: torch.nn.Module, dtype: torch.dtype) -> tuple[list[str], bool]:
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    if isinstance(owner, PreTrainedModel):
        patterns = list(getattr(owner, "_keep_in_fp32_modules_strict", None) or [])
        if dtype == torch.float16:
            patterns += list(owner._keep_in_fp32_modules or [])
        return patterns, False
    if isinstance(owner, ModelMixin):
        return list(owner._keep_in_fp32_modules or []), True
    return [], False
