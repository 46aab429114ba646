"""Block swap (`train.block_swap: N`): the frozen weights of the denoiser's last N blocks live on the CPU and
are streamed to the device for each block's forward, then dropped.

The family names the denoiser's block lists (`Family.swap_blocks`: FLUX's double- and single-stream blocks,
SD3's joint blocks). A forward pre-hook on each swapped block copies its frozen weights in; a forward hook
points them back at their CPU copies. Trained parameters (the adapters inside those blocks) stay on the
device with their gradients and optimizer state.

Why this is correct and saves memory only with gradient checkpointing (the recipe requires it): autograd
keeps the tensors a forward used until their backward. Under per-block checkpointing nothing of a block's
forward is kept; its backward re-runs the forward, which fires the pre-hook again, so the block's weights are
on the device exactly while its recomputed forward and its backward need them (the recomputed graph holds
the copies, freed when that block's backward ends). Without checkpointing the copies would stay referenced
by the graph until the backward: right results, no saving. torch's non-reentrant checkpoint stops a
recomputed forward as soon as it has rebuilt the last tensor the backward needs ("early stop"): the block's
forward hook then never runs, its weights would keep pointing at the device copies, and by the end of the
backward every swapped block would sit on the device. So the denoiser's checkpoints here recompute each
block to its end (tests/test_offload.py catches the difference).

One-way: a frozen weight is only ever copied host -> device, from pinned memory on CUDA; the device copy is
dropped, never copied back (its home copy is unchanged: nothing trains it). Per step each swapped block is
uploaded twice (its forward and its recomputed forward), so `bytes_moved` per step is twice the swapped
weights; a two-way swap (each upload paired with a copy back, as sd-scripts / musubi-tuner did before their
H2D-only mode) moves twice that.

Overlap (`prefetch`, on by default on CUDA): when block i starts, block i+1's upload (i-1's while the backward
recomputes) is queued on a side stream, so it runs while block i computes;
block i+1 waits for that copy's event before it starts. Two blocks' copies are then on the device at once
instead of one.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.utils.checkpoint

from finetune.errors import ModelError


class BlockSwap:
    def __init__(self, denoiser: torch.nn.Module, family, count: int, device: Any, prefetch: bool | None = None):
        blocks = swappable_blocks(denoiser, family)
        if not blocks:
            raise ModelError(f"train.block_swap: the {family.name} family's denoiser has no block lists to swap "
                             "(transformer families: sd3, flux); set train.block_swap: 0")
        if count > len(blocks):
            raise ModelError(f"train.block_swap: {count} is more than the denoiser's {len(blocks)} blocks; use at "
                             f"most {len(blocks)}")
        self.device = torch.device(device)
        self.blocks = blocks[len(blocks) - count:]
        self.home: dict[torch.nn.Parameter, torch.Tensor] = {}
        self.resident = self.max_resident = self.bytes_moved = self.loads = self.prefetched = 0
        cuda = self.device.type == "cuda"
        self.prefetch = cuda if prefetch is None else prefetch
        self.stream = torch.cuda.Stream(self.device) if cuda and self.prefetch else None
        self.pending: dict[int, tuple[dict, Any]] = {}  # block index -> (param -> copy, the copy's CUDA event)
        self._place(denoiser)
        _recompute_to_the_end(denoiser)
        for i, block in enumerate(self.blocks):
            block.register_forward_pre_hook(lambda b, args, i=i: self._load(i))
            block.register_forward_hook(lambda b, args, out, i=i: self._unload(i))

    # --------------------------------------------------------------------------------------- set-up
    def _place(self, denoiser: torch.nn.Module) -> None:
        """Frozen weights of the swapped blocks to (pinned) CPU memory, everything else to the device."""
        pin = self.device.type == "cuda"
        for block in self.blocks:
            for p in block.parameters():
                if not p.requires_grad:
                    home = p.data.to("cpu")
                    self.home[p] = home.pin_memory() if pin else home
                    p.data = self.home[p]
        for p in denoiser.parameters():
            if p not in self.home:
                p.data = p.data.to(self.device)
        for module in denoiser.modules():
            for name, buf in module.named_buffers(recurse=False):
                if buf is not None:
                    module._buffers[name] = buf.to(self.device)

    def swapped_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.home.values())

    # --------------------------------------------------------------------------------------- hooks
    def _frozen(self, block: torch.nn.Module):
        return [p for p in block.parameters() if p in self.home]

    def _upload(self, i: int) -> tuple[dict, Any]:
        """Copies of block i's frozen weights on the device (on the side stream when there is one)."""
        stream = self.stream
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            # copy=True: a real copy even when device and home are the same (the CPU tests exercise it)
            copies = {p: self.home[p].to(self.device, non_blocking=True, copy=True) for p in self._frozen(self.blocks[i])}
            event = stream.record_event() if stream is not None else None
        self.bytes_moved += sum(t.numel() * t.element_size() for t in copies.values())
        return copies, event

    def _load(self, i: int) -> None:
        copies, event = self.pending.pop(i, None) or self._upload(i)
        for j in list(self.pending):  # a guess that did not come true: its copies go
            del self.pending[j]
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in copies.values():  # the allocator must not reuse them while this stream computes
                t.record_stream(current)
        moved = 0
        for p, copy in copies.items():
            p.data = copy
            moved += p.numel() * p.element_size()
        self.loads += 1
        self.resident += moved
        nxt = self._next(i)
        if self.prefetch and nxt is not None:
            self.pending[nxt] = self._upload(nxt)
            self.prefetched += 1
        self.max_resident = max(self.max_resident, self.resident + self._pending_bytes())

    def _next(self, i: int) -> int | None:
        """The block that runs next: the following one in a forward, the previous one while the backward
        recomputes (torch's checkpoint asks the same question of the autograd engine)."""
        in_backward = torch._C._current_graph_task_id() != -1
        nxt = i - 1 if in_backward else i + 1
        return nxt if 0 <= nxt < len(self.blocks) else None

    def _pending_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for copies, _ in self.pending.values() for t in copies.values())

    def _unload(self, i: int) -> None:
        for p in self._frozen(self.blocks[i]):
            self.resident -= p.numel() * p.element_size()
            p.data = self.home[p]  # the device copy lives on only where the autograd graph holds it


def _recompute_to_the_end(denoiser: torch.nn.Module) -> None:
    """Use a checkpoint function without early stop (see the module's docstring) where checkpointing is on."""
    inner = _unwrapped(denoiser)
    if getattr(inner, "is_gradient_checkpointing", False):
        inner.enable_gradient_checkpointing(_checkpoint_whole_block)


def checkpoint_block(module, *args, **kwargs):
    """diffusers' gradient-checkpointing function (non-reentrant), keyword arguments passed on too: some
    transformers hand their blocks keywords (HunyuanImage's attention_mask), which diffusers' own drops with a
    TypeError (diffusers 0.42.1)."""
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False, **kwargs)


def _checkpoint_whole_block(module, *args, **kwargs):
    # checkpoint_block, with the recomputation run to the block's end so its forward hook fires
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False, early_stop=False, **kwargs)


def _unwrapped(denoiser: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(denoiser, "module", denoiser)
    return getattr(inner, "_orig_mod", inner)


def swappable_blocks(denoiser: torch.nn.Module, family) -> list[torch.nn.Module]:
    """The denoiser's blocks in the family's block lists, in order (a wrapped denoiser is unwrapped)."""
    inner = _unwrapped(denoiser)
    return [block for name in family.swap_blocks for block in getattr(inner, name, [])]
