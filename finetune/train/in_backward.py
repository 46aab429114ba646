"""`train.optimizer_in_backward`: each trained tensor takes its optimizer step inside the backward pass, the
moment its gradient is complete, and its gradient is freed at once (OneTrainer's "fused back pass").

Why: an ordinary step holds every gradient until the backward ends; here at most the gradients still in
flight are held, so a full fine-tune's peak drops by up to the size of its gradients (docs/memory.md).

How: a post-accumulate-grad hook per trained tensor runs the run's own optimizer for that tensor alone (its
group's hyper-parameters and learning rate, its state in the optimizer's state dict), so checkpoints, the
learning-rate schedule and the optimizer's kernels are the ordinary ones and the result is the same
element for element as one step over all tensors (tests/test_speed.py).

What cannot be exact is refused at recipe time (finetune/sections.py): clipping needs the norm of every
gradient before any tensor steps; fp16's loss scaler must see every gradient before deciding to skip; a
dropped step (`on_nan: skip`) cannot be taken back. Several processes are refused by the trainer (DDP
averages a gradient after its hook has run). Gradient accumulation is exact: the hooks step only on the
last micro-batch of an optimizer step, and the earlier micro-batches hold their gradients as usual.
"""

from __future__ import annotations

import torch

from finetune.errors import RunError


class StepInBackward:
    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]):
        self.optimizer = optimizer  # the torch optimizer (accelerate's wrapper unwrapped)
        self.groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        self.armed = False  # only the last micro-batch of an optimizer step steps
        self.resting: set[int] = set()  # tensors whose group is outside its active window this step
        self.stepped: set[int] = set()
        self.square_sum: torch.Tensor | None = None  # the step's squared gradient norm, on the device
        self.handles = [p.register_post_accumulate_grad_hook(self._step) for p in params]

    def arm(self, on: bool, resting: set[int]) -> None:
        """Before a micro-batch's backward: `on` when it is the optimizer step's last one."""
        self.armed, self.resting = on, resting
        self.stepped.clear()
        if on:
            self.square_sum = None

    def norm(self, device) -> torch.Tensor:
        """The gradient norm of the step just taken (the ordinary step's unclipped norm)."""
        if self.square_sum is None:
            return torch.zeros((), device=device)
        return self.square_sum.sqrt()

    def _step(self, p: torch.nn.Parameter) -> None:
        if not self.armed:
            return  # an accumulating micro-batch: the gradient waits for the next one
        key = id(p)
        if key in self.stepped:  # a tensor used in two places whose gradient arrives in parts: not exact
            raise RunError("train.optimizer_in_backward: a trained tensor received its gradient twice in one "
                           "backward (shared weights); set train.optimizer_in_backward: false")
        self.stepped.add(key)
        if key in self.resting:
            p.grad = None
            return
        square = p.grad.detach().float().square().sum()
        self.square_sum = square if self.square_sum is None else self.square_sum + square
        group = self.groups[key]
        saved = [g["params"] for g in self.optimizer.param_groups]
        for g in self.optimizer.param_groups:  # the optimizer's own step, over this one tensor
            g["params"] = [p] if g is group else []
        try:
            self.optimizer.step()
        finally:
            for g, params in zip(self.optimizer.param_groups, saved, strict=True):
                g["params"] = params
        p.grad = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
