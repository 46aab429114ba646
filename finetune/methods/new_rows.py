"""An input embedding whose new token rows are their own small parameter (Textual Inversion, pivotal).

Imported only when a method is built (it needs torch). Why not peft's trainable tokens: its layer rebuilds
the whole embedding table on every forward (index_copy) and back-propagates a dense vocabulary-sized
gradient; on a text encoder that also carries pivotal's LoRA it is a second peft adapter, which peft warns
about and which puts a second config into the encoder's `peft_config`, and `get_input_embeddings().weight`
then reads the untrained rows. Here the gradient reaches only the new rows, and the encoder's LoRA stays
its only adapter.
"""

from __future__ import annotations

import torch


class NewRowsEmbedding(torch.nn.Module):
    """`base` (the encoder's frozen embedding, already resized to hold the new ids) with the rows of `ids`
    replaced by `rows`, an fp32 parameter initialised from the base's values at those ids."""

    def __init__(self, base: torch.nn.Embedding, ids: list[int]):
        super().__init__()
        self.base = base
        self.rows = torch.nn.Parameter(base.weight.detach()[ids].float().clone())
        slot = torch.full((base.num_embeddings,), -1, dtype=torch.long, device=base.weight.device)
        slot[ids] = torch.arange(len(ids), device=base.weight.device)
        self.register_buffer("slot", slot, persistent=False)  # token id -> row of `rows`, -1 for old tokens
        self.ids = list(ids)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        slot = self.slot[input_ids]
        # every row takes part (clamped index), so DDP sees a gradient for `rows` even in a batch without
        # the token; where() sends gradient only to the positions that hold a new token
        new = self.rows[slot.clamp(min=0)].to(out.dtype)
        return torch.where((slot >= 0).unsqueeze(-1), new, out)

    @property
    def weight(self) -> torch.Tensor:
        """The effective table (old rows and trained new rows), as a plain embedding's `weight` reads."""
        table = self.base.weight.detach()
        return table.index_put((torch.tensor(self.ids, device=table.device),), self.rows.detach().to(table.dtype))

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim
