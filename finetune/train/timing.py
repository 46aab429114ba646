"""Where the time of a step goes. Off by default (a no-op); tools/bench.py turns it on."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class PhaseTimer:
    """Accumulates wall time per named phase. On a GPU it synchronises around each phase, which costs a
    little speed, so only benchmarks enable it."""

    def __init__(self, enabled: bool = False):
        self.enabled = enabled
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def _sync(self) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    @contextmanager
    def __call__(self, phase: str):
        if not self.enabled:
            yield
            return
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[phase] += time.perf_counter() - start
            self.counts[phase] += 1

    def add(self, phase: str, seconds: float) -> None:
        if self.enabled:
            self.totals[phase] += seconds
            self.counts[phase] += 1

    def reset(self) -> None:
        self.totals.clear()
        self.counts.clear()
