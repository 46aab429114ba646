"""`train.compile`: torch.compile the whole denoiser (`true`) or each of its repeated blocks (`blocks`).

Regional compile ("blocks") compiles each block's `forward` where the family names its block lists (the ones
block swap streams, or `Family.compile_blocks`; else diffusers' own `_repeated_blocks`). Blocks of one class
share one compiled code (torch.compile caches per code object and guards on shapes, not on which block), so
a 57-block FLUX compiles two blocks' worth instead of the whole graph, and what runs between the blocks
stays eager. Only `forward` is compiled, not the module's call: hooks on the block (block swap's uploads)
and the gradient-checkpointing wrapper around it run eagerly, outside the graph.

Shapes: with buckets the blocks are compiled with dynamic shapes from the first step, so a new bucket
does not recompile. `CompileWatch` counts the graphs dynamo compiles during each training step (validation
and the base's samples compile their own no-grad graphs, outside the steps); the loop reports them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from finetune.errors import ModelError

#: torch.compile's backend; FINETUNE_COMPILE_BACKEND=eager (or aot_eager) gives the same graphs, guards and
#: recompile counts without code generation (tests, tools/gpu_bench.sh's CPU check, debugging graph breaks)
BACKEND = os.environ.get("FINETUNE_COMPILE_BACKEND", "inductor")


def compile_denoiser(denoiser: torch.nn.Module, family, how: bool | str, dynamic: bool) -> int:
    """Compile in place (parameter names stay: checkpoints and exports are unchanged); returns the number of
    modules compiled."""
    if how is True:
        denoiser.compile(backend=BACKEND, dynamic=True if dynamic else None)
        return 1
    blocks = compiled_blocks(denoiser, family)
    if not blocks:
        raise ModelError(f"train.compile: blocks: the {family.name} family names no repeated blocks; use "
                         "train.compile: true (the whole denoiser)")
    for block in blocks:
        block.forward = torch.compile(block.forward, backend=BACKEND, dynamic=True if dynamic else None)
    return len(blocks)


def compiled_blocks(denoiser: torch.nn.Module, family) -> list[torch.nn.Module]:
    """The family's block lists (a list attribute or a single block), else diffusers' `_repeated_blocks`."""
    inner = getattr(denoiser, "module", denoiser)
    names = family.compile_blocks or family.swap_blocks
    if names:
        found = [getattr(inner, name, None) for name in names]
        return [b for item in found if item is not None
                for b in (item if isinstance(item, torch.nn.ModuleList) else [item])]
    classes = set(getattr(inner, "_repeated_blocks", None) or ())
    return [m for m in inner.modules() if type(m).__name__ in classes]


@dataclass
class CompileWatch:
    """Graphs compiled per training step (dynamo's own count), to show that compiling stops after the first
    steps: a recompile later is a shape or guard the run keeps changing, worth knowing about."""

    per_step: list[int] = field(default_factory=list)
    _start: int | None = None

    @staticmethod
    def graphs() -> int:
        from torch._dynamo.utils import counters

        return counters["stats"]["unique_graphs"]

    def before_step(self) -> None:
        """At each micro-batch; the count runs from an optimizer step's first micro-batch to its end."""
        if self._start is None:
            self._start = self.graphs()

    def after_step(self) -> None:
        """At the end of an optimizer step (applied or dropped)."""
        self.per_step.append(self.graphs() - self._start)
        self._start = None

    def after(self, steps: int) -> int:
        """Graphs compiled in the steps after the first `steps`."""
        return sum(self.per_step[steps:])

    def line(self) -> str:
        first = ", ".join(f"{n} at step {i + 1}" for i, n in enumerate(self.per_step[:2]))
        return f"compile: {first}; {self.after(2)} recompiles after step 2"
