"""Host syncs: one read from the device per optimizer step, and a counter that proves it.

On a GPU the host queues kernels ahead of the device; every read of a device value (`loss.item()`,
`float(norm)`, `if tensor:`, a mask index) makes the host wait until the queue drains, so the next step's
kernels start late. A step must read some values: whether its gradient is finite decides whether it is
applied. `StepWatch` gathers everything the host needs about a step (the clipped norm, whether any
micro-batch's loss or VAE latents were non-finite, whether any process asked to stop, and the values the
bar and the logs show) into one small tensor and reads it once, at the optimizer step.

`HostReads` counts the reads a block of code makes (tools/bench.py --profile, tests/test_host_sync.py).
"""

from __future__ import annotations

import math
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

FLAGS = ("loss", "latents")  # what a micro-batch may have had non-finite


@dataclass
class StepReport:
    norm: float
    bad: dict[str, int]  # flag -> micro-batches (over all processes) with non-finite values
    stop: bool  # any process asked to stop
    logs: dict[str, float]
    paths: list[str] = field(default_factory=list)  # the step's files, for messages

    def problem(self, scaler: bool) -> tuple[str, float] | None:
        """What makes this step unusable, with the value to show; None when it may be applied. Under fp16
        (`scaler`) an inf/NaN norm alone is the loss scaler's own signal, not a problem."""
        if self.bad.get("loss"):
            loss = self.logs.get("loss", math.nan)
            return "loss", loss if not math.isfinite(loss) else math.nan
        if not math.isfinite(self.norm) and not scaler:
            return "gradient norm", self.norm
        return None


class StepWatch:
    """Collects an optimizer step's device-side facts without reading them; `read` reads them all at once."""

    def __init__(self):
        self._bad: dict[str, torch.Tensor] = {}
        self._paths: list[str] = []

    def note(self, what: str, values: torch.Tensor) -> None:
        """Count, on the device, a micro-batch whose `what` holds a non-finite value (no host read)."""
        bad = (~torch.isfinite(values.detach())).any().to(torch.float32)
        self._bad[what] = self._bad[what] + bad if what in self._bad else bad

    def note_batch(self, batch: dict[str, Any]) -> None:
        self._paths += batch.get("paths", [])

    def read(self, acc, norm: torch.Tensor | None, logs: dict[str, Any], stop: bool) -> StepReport:
        """The step's one host sync. Flags are summed over processes (the norm already is reduced: DDP
        all-reduces gradients before it is taken), so every process takes the same decision."""
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor; its full value is the global norm (a collective)
            norm = norm.full_tensor()
        norm = torch.as_tensor(math.nan if norm is None else norm, device=acc.device)  # None: DeepSpeed
        device = norm.device
        zero = torch.zeros((), device=device)
        flags = torch.stack([self._bad.get(k, zero).to(device) for k in FLAGS])
        many = acc.num_processes > 1
        if many:  # the stop request rides the same collective instead of one of its own
            flags = acc.reduce(torch.cat([flags, (zero + float(stop)).reshape(1)]), reduction="sum")
        names = list(logs)
        parts = [norm.detach().float().reshape(1), flags.float()]
        parts += [torch.as_tensor(logs[k]).to(device).float().reshape(1) for k in names]
        values = torch.cat(parts).tolist()  # <- the one read
        n = len(FLAGS)
        report = StepReport(
            norm=values[0], bad={k: int(v) for k, v in zip(FLAGS, values[1:1 + n], strict=True)},
            stop=bool(values[1 + n]) if many else stop,
            logs=dict(zip(names, values[1 + n + many:], strict=True)), paths=self._paths,
        )
        self._bad, self._paths = {}, []
        return report


# ------------------------------------------------------------------------------------------ counting
READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy", "nonzero")


class HostReads:
    """Counts reads of tensor values by the host while active (a context manager; `pause()` to skip code).

    On a GPU only reads of CUDA tensors count: those are the syncs. On a CPU every read counts except of
    tensors registered with `exempt` (what the data loader hands over: on a GPU run it stays on the host)
    and what torch itself reads on the host on a GPU run too: torch.optim's step counters, the DataLoader's
    per-epoch seed."""

    def __init__(self, cuda_only: bool | None = None):
        self.cuda_only = torch.cuda.is_available() if cuda_only is None else cuda_only
        self.count = 0
        self.sites: Counter = Counter()
        self._exempt: dict[int, torch.Tensor] = {}
        self._active = False
        self._saved: dict[str, Any] = {}

    def exempt(self, obj: Any) -> None:
        """Host-side tensors (a batch from the loader, nested dicts/lists) whose reads are not syncs."""
        if isinstance(obj, torch.Tensor):
            self._exempt[id(obj)] = obj
        elif isinstance(obj, dict):
            for v in obj.values():
                self.exempt(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                self.exempt(v)

    def _counts(self, t: torch.Tensor) -> bool:
        if self.cuda_only:
            return t.is_cuda
        if id(t) in self._exempt:
            return False
        host_side = ("torch/optim/", "torch/utils/data/")  # CPU step counters; the loader's per-epoch seed
        return not any(h in f.filename for f in traceback.extract_stack(limit=5)[:-2] for h in host_side)

    def _wrap(self, name: str):
        original = self._saved[name]
        watcher = self

        def read(t, *args, **kwargs):
            if watcher._active and watcher._counts(t):
                watcher.count += 1
                site = traceback.extract_stack(limit=2)[0]
                watcher.sites[f"{name} at {site.filename.rsplit('/', 2)[-1]}:{site.lineno}"] += 1
            watcher._active, was = False, watcher._active  # a read inside a read (tolist -> item) is one
            try:
                return original(t, *args, **kwargs)
            finally:
                watcher._active = was

        return read

    def __enter__(self) -> HostReads:
        for name in READS:
            self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._wrap(name))
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        self._active = False
        for name, fn in self._saved.items():
            setattr(torch.Tensor, name, fn)
        self._saved.clear()

    def pause(self):
        """Reads inside this block do not count."""
        return _Switch(self, False)

    def watching(self):
        """Reads inside this block count (inside a `pause`)."""
        return _Switch(self, True)


class _Switch:
    def __init__(self, reads: HostReads, on: bool):
        self.reads, self.on = reads, on

    def __enter__(self) -> None:
        self.was, self.reads._active = self.reads._active, self.on

    def __exit__(self, *exc) -> None:
        self.reads._active = self.was
