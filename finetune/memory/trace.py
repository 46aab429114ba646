"""Peak live tensor bytes of a piece of work, counted from the tensors themselves.

`LiveBytes` is a dispatch mode that sees every tensor an operator returns (forward, backward, optimizer)
and follows its storage until it is freed (a weak reference's callback), so `peak` is the largest number of
bytes the work held at once beyond what existed before it started. It works the same on the meta device
(shapes only, no memory, no arithmetic: the estimate's activation trace of a 12B model takes seconds) and
on real tensors (the tests' measurement of a real CPU step).
"""

from __future__ import annotations

import contextlib
import weakref
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # a view or an in-place result shares a storage that is either counted already or existed before
        # (a weight): only an operator's fresh outputs allocate
        if not any(r.alias_info is not None for r in func._schema.returns):
            for t in _tensors(out):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr() if t.device.type != "meta" else id(storage)
        if key in self._seen or storage.nbytes() == 0:
            return
        size = storage.nbytes()
        self._seen[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        try:
            weakref.finalize(storage, self._free, key)
        except TypeError:  # a storage that takes no weak references: count it as held to the end
            pass

    def _free(self, key: int) -> None:
        self.live -= self._seen.pop(key, 0)


def _tensors(out):
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (list, tuple)):
        for o in out:
            yield from _tensors(o)


class _FlashLike(torch.autograd.Function):
    """Scaled dot-product attention with the memory of a fused kernel (flash / memory-efficient, what CUDA
    and recent CPU builds run): the output plus a float32 log-sum-exp per query are saved, never the L x L
    weights. The meta device would otherwise trace the unfused maths and count the weights."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    return _FlashLike.apply(query, key, value)


@contextlib.contextmanager
def meta_safe():
    """Let the language-model encoders and variable-length captions run on the meta device, where no value can
    be read: transformers' check whether a padding mask is all ones (to skip the causal mask, or the bidirectional
    one of T5 given a mask, as Chroma's) is answered 'no' (the mask is built, as with real padding), and a boolean selection (Z-Image's captions cut to their mask)
    keeps every element, the longest a caption can be."""
    import torch.fx.experimental._config as fx_config

    with mock.patch("transformers.masking_utils._ignore_causal_mask_sdpa", return_value=False), \
            mock.patch("transformers.masking_utils._ignore_bidirectional_mask_sdpa", return_value=False), \
            mock.patch.object(fx_config, "meta_nonzero_assume_all_nonzero", True):
        yield
