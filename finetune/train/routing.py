"""`train.routing` (TREAD, Krause et al. 2025, as SimpleTuner offers it for FLUX): in the training forward, a
random share of the image tokens skips a window of the denoiser's blocks. At the window's first block the
kept tokens are gathered (text tokens always stay); the blocks inside compute on the shorter sequence; after
the window's last block the routed tokens are put back in place and the skipped ones rejoin as they were when
they left (a skip connection: their gradient flows through it). Fewer tokens through the middle blocks: a
cheaper forward and backward, at the price of a noisier training signal early on.

Routing is drawn once per training forward from the run's seed and the step (the same on resume) and shared
by the batch (one rotary-position slice for all examples). Validation, the base's predictions for
preservation (no gradient) and inference see every token. Under gradient checkpointing a block's recomputed
forward reuses the routing of the forward it recomputes.

The family says where its blocks keep the image tokens and their rotary positions (`Family.token_routing`):
'text_first_rope' (FLUX: `hidden_states`, and `image_rotary_emb` over text-then-image positions) or 'plain'
(SD3: `hidden_states`, positions added before the blocks).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch

from finetune.errors import ModelError

ARGS = {"hidden_states": 0, "encoder_hidden_states": 1, "image_rotary_emb": 3}  # blocks' positional order


class TokenRouter:
    def __init__(self, denoiser: torch.nn.Module, family, cfg, seed: int):
        from finetune.models.offload import swappable_blocks

        if family.token_routing is None:
            raise ModelError(f"train.routing: the {family.name} family's blocks do not route tokens here "
                             "(flux, sd3 do); remove train.routing")
        blocks = swappable_blocks(denoiser, family)
        first, last = cfg.first_block % len(blocks), cfg.last_block % len(blocks)
        if first > last:
            raise ModelError(f"train.routing: first_block {cfg.first_block} comes after last_block "
                             f"{cfg.last_block} among the denoiser's {len(blocks)} blocks")
        self.window = blocks[first:last + 1]
        self.drop, self.seed, self.rope = cfg.drop_ratio, seed, family.token_routing == "text_first_rope"
        self.active = False
        self.keep: torch.Tensor | None = None  # kept image-token indices of the current training forward
        self.full: torch.Tensor | None = None  # every image token as the window's first block received them
        self.rope_slice: Any = None
        for i, block in enumerate(self.window):
            block.register_forward_pre_hook(lambda b, a, k, i=i: self._enter(i, a, k), with_kwargs=True)
        self.window[-1].register_forward_hook(lambda b, a, out: self._leave(out))

    @contextmanager
    def routing(self, step: int):
        """Around the training prediction of a step: its forward routes tokens (and so will its recomputation)."""
        from finetune.train.loss import hash_seed

        self.active, self.keep, self.full, self.rope_slice = True, None, None, None
        self.generator = torch.Generator().manual_seed(hash_seed(self.seed, step, 0x7EAD))
        try:
            yield
        finally:
            self.active = False

    def _routes(self) -> bool:
        if self.active:
            return True
        # a recomputed forward inside the backward (gradient checkpointing) routes as its forward did
        return self.keep is not None and torch._C._current_graph_task_id() != -1

    def _enter(self, i: int, args: tuple, kwargs: dict):
        if not self._routes():
            return None
        args, kwargs = list(args), dict(kwargs)
        if i == 0:
            hidden = _get(args, kwargs, "hidden_states")
            if self.keep is None or self.active:  # the forward draws; a recomputation reuses
                self._draw(hidden, _get(args, kwargs, "encoder_hidden_states"), _get(args, kwargs, "image_rotary_emb"))
            self.full = hidden
            _set(args, kwargs, "hidden_states", hidden.index_select(1, self.keep))
        if self.rope:
            _set(args, kwargs, "image_rotary_emb", self.rope_slice)
        return tuple(args), kwargs

    def _draw(self, hidden: torch.Tensor, text: torch.Tensor | None, rope) -> None:
        n = hidden.shape[1]
        kept = max(1, round(n * (1.0 - self.drop)))
        order = torch.randperm(n, generator=self.generator)[:kept].sort().values
        self.keep = order.to(hidden.device)
        if self.rope:
            texts = text.shape[1]
            rows = torch.cat([torch.arange(texts), texts + order]).to(rope[0].device)
            self.rope_slice = tuple(r.index_select(0, rows) for r in rope)

    def _leave(self, out):
        if not self._routes():
            return None
        text, routed = out
        return text, self.full.index_copy(1, self.keep, routed)  # skipped tokens rejoin unchanged


def _get(args: list, kwargs: dict, name: str):
    return kwargs[name] if name in kwargs else (args[ARGS[name]] if len(args) > ARGS[name] else None)


def _set(args: list, kwargs: dict, name: str, value) -> None:
    if name in kwargs or len(args) <= ARGS[name]:
        kwargs[name] = value
    else:
        args[ARGS[name]] = value
