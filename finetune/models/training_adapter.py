"""A training adapter (`model.training_adapter`): a LoRA applied to the frozen base while a method trains on top.

Step-distilled bases (FLUX.1 [schnell], Z-Image-Turbo, the toy's toy-flux-turbo) lose their few-step sampling
when a LoRA trains on them directly: the flow-matching loss pulls the new weights back toward an undistilled
model. A de-distillation LoRA applied while training absorbs that pull, so the trained LoRA learns the subject
only; at export and at inference it is gone, and the LoRA works on the distilled base at its own few steps
(ai-toolkit's `assistant_lora_path`, the FLUX.1 [schnell] and Z-Image-Turbo training adapters; docs/toy.md).

The adapter is applied, not merged: a forward hook on each layer it targets adds `scale * B(A(x))` to the base
layer's output. So it acts on any base layer (plain, fp8, bitsandbytes 4-bit or 8-bit, block-swapped: the hook
sits on the layer itself, which a peft adapter later wraps as its `base_layer`), it can be switched off for a
validation grid and back on exactly, and its tensors belong to no module: no optimizer sees them (no gradient,
no update) and no export can write them. Up to rounding the forward equals the base with the LoRA fused in.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from finetune.errors import ModelError


class _Applied:
    """One layer's low-rank update, moved to the input's device and dtype at its first use there."""

    def __init__(self, layer: torch.nn.Module, up: torch.Tensor, down: torch.Tensor, owner: TrainingAdapter):
        self.layer, self.up, self.down, self.owner = layer, up, down, owner
        self.handle = layer.register_forward_hook(self)

    def _factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.up.device != x.device or self.up.dtype != x.dtype:
            self.up, self.down = self.up.to(x.device, x.dtype), self.down.to(x.device, x.dtype)
        return self.up, self.down

    def __call__(self, layer, args, output):
        if not self.owner.enabled:
            return None
        x = args[0]
        up, down = self._factors(x)
        if isinstance(layer, torch.nn.Conv2d):
            h = F.conv2d(x, down, stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
            return output + F.conv2d(h, up)
        return output + F.linear(F.linear(x, down), up)


class TrainingAdapter:
    """A LoRA file applied to `modules` (the base's components by name) until `remove()`; `off()` suspends it."""

    def __init__(self, path: Path, layers: list[_Applied]):
        self.path, self.layers, self.enabled = path, layers, True

    @classmethod
    def attach(cls, path: str | Path, modules: dict[str, torch.nn.Module], family,
               allow_pickle: bool = False) -> TrainingAdapter:
        """Read the LoRA at `path` (any LoRA layout we read: diffusers, peft, kohya, the family's own) and hook it
        into `modules`. Every layer is checked before any hook is placed: a layer the base does not have, or
        of another shape, is a one-line ModelError naming the layer."""
        from finetune.export.adapters import check_complete, locate_layer, read_adapter
        from finetune.export.layouts import bound_names

        adapter = read_adapter(path, allow_pickle=allow_pickle, family=family, modules=modules)
        names = bound_names(family.kohya_names, modules)
        check_complete(adapter, modules, names)
        where = f"model.training_adapter '{path}'"
        found = []
        for name, layer in adapter.layers.items():
            module = locate_layer(name, modules, names, where)
            found.append((module, *_fit(module, *_factors(name, layer, where), f"{where}: layer '{name}'")))
        owner = cls(Path(path), [])
        owner.layers = [_Applied(module, up, down, owner) for module, up, down in found]
        return owner

    @contextmanager
    def off(self):
        """Sample (or compute anything) without the adapter, then apply it again."""
        was, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = was

    def remove(self) -> None:
        for applied in self.layers:
            applied.handle.remove()
        self.layers = []

    def describe(self) -> str:
        return f"training adapter {self.path.name} ({len(self.layers)} layers, applied while training, not exported)"


def _factors(name: str, layer, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B * scale, A) in fp32: the only adapters applied this way are plain low-rank ones."""
    from finetune.export.adapters import low_rank_factors

    up, down = low_rank_factors(layer, f"{where}: layer '{name}' is a {{what}} layer; a training adapter must be a "
                                "plain LoRA (fuse the adapter into the base with tools/merge.py fuse and train on that "
                                "instead)")
    return up.float().contiguous(), down.float().contiguous()


def _fit(module: torch.nn.Module, up: torch.Tensor, down: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors shaped for the layer's hook, or a ModelError: Linear [out, r] @ [r, in]; Conv2d [r, in, kh, kw]
    then [out, r, 1, 1]."""
    if isinstance(module, torch.nn.Conv2d):
        up = up.reshape(*up.shape[:2], 1, 1) if up.dim() == 2 else up
        ok = (module.groups == 1 and down.dim() == 4 and up.dim() == 4 and up.shape[2:] == (1, 1)
              and tuple(down.shape[1:]) == (module.in_channels, *module.kernel_size)
              and tuple(up.shape[:2]) == (module.out_channels, down.shape[0]))
        shape = (module.out_channels, module.in_channels, *module.kernel_size)
    else:
        in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
        ok = in_f is not None and down.dim() == 2 and up.dim() == 2 and down.shape[1] == in_f \
            and tuple(up.shape) == (out_f, down.shape[0])
        shape = (out_f, in_f)
    if not ok:
        raise ModelError(f"{where} ({tuple(up.shape)} x {tuple(down.shape)}) does not fit the base layer {shape} "
                         "(an adapter for another base?)")
    return up, down


def adapter_file(value: str) -> Path:
    """`model.training_adapter` as a local file or folder: a shipped toy adapter's name, a local path, a hub file
    'org/name/path/file.safetensors' or a hub repo 'org/name' (its pytorch_lora_weights.safetensors, or its one
    .safetensors file). Hub files are fetched into the local cache (offline: a one-line error)."""
    from finetune.routes import is_hub_reference
    from finetune.toy import toy_adapter_path

    toy = toy_adapter_path(value)
    if toy is not None:
        return toy
    path = Path(value).expanduser()
    if path.exists() or not is_hub_reference(value):
        if not path.exists():
            raise ModelError(f"model.training_adapter '{value}': no such file or folder; check the path")
        return path
    return _from_hub(value)


def _from_hub(value: str) -> Path:
    """A hub file into the local cache: 'org/name/path/file.safetensors', or 'org/name' for its diffusers LoRA
    file (pytorch_lora_weights.safetensors), as diffusers' load_lora_weights finds it."""
    import os

    from huggingface_hub import hf_hub_download

    from finetune.export.layers import DIFFUSERS_FILE

    org, name, *rest = value.split("/")
    repo, file = f"{org}/{name}", "/".join(rest) or DIFFUSERS_FILE
    try:
        return Path(hf_hub_download(repo, file))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo or file, gated: huggingface_hub's own errors
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        why = "the hub is offline (HF_HUB_OFFLINE=1) and it is not in the local cache" if offline else \
            str(e).splitlines()[0]
        hint = "" if rest else f"; a repo without {DIFFUSERS_FILE}: name its file, {repo}/<file>.safetensors"
        raise ModelError(f"model.training_adapter '{value}': {file} could not be fetched from {repo}: {why}{hint}")\
            from None
