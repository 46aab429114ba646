"""Checkpoints you can trust.

A checkpoint is a folder `checkpoints/step-NNNNNN/` holding
  trainable.safetensors   every trained parameter, by module-qualified name (the frozen base is not copied)
  ema.safetensors         the EMA shadow weights by parameter name, its update count and settings in the
                          header (diffusers' EMAModel.state_dict), when EMA is on
  accelerate files        optimizer, LR scheduler, grad scaler and every process's RNG (accelerate.save_state)
  trainer_state.json      step, epoch, position in the epoch, dataset and recipe fingerprints
  COMPLETE                written last: a folder without it is ignored

It is written under a temporary name and renamed into place, and old checkpoints are removed only after
the new one is complete, so an interruption at any moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from finetune.errors import UserError
from finetune.export.io import fsync_tree, save_safetensors, write_text_atomic

MARKER = "COMPLETE"
STATE = "trainer_state.json"
TRAINABLE = "trainable.safetensors"
EMA = "ema.safetensors"


@dataclass
class TrainState:
    """Where the run is. Saved in every checkpoint and restored exactly on resume."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed (per process)
    nan_skips: int = 0
    dataset_fingerprint: str = ""
    recipe_fingerprint: str = ""


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def trainable_params(modules: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """Every parameter that trains, named '<module>.<parameter name>'."""
    out = {}
    for mname, module in modules.items():
        for pname, p in module.named_parameters():
            if p.requires_grad:
                out[f"{mname}.{pname}"] = p
    return out


def _check_space(root: Path, needed: int) -> None:
    free = shutil.disk_usage(root).free
    if free < needed:
        raise UserError(
            f"not enough disk space for a checkpoint in {root}: need ~{needed / 2**20:.0f} MiB, "
            f"{free / 2**20:.0f} MiB free; free some space (the last checkpoint is intact) and resume"
        )


def save_checkpoint(accelerator, root: Path, state: TrainState, params, ema=None, keep_last: int = 2) -> Path:
    """Write a complete checkpoint atomically (all processes call this), then rotate old ones."""
    final = step_dir(root, state.step)
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        need = sum(p.numel() * p.element_size() for p in params.values()) * 4 + 64 * 2**20
        _check_space(root, need)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # optimizer, scheduler, scaler, RNG of every process (models skipped)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_safetensors({k: _full(v) for k, v in params.items()}, tmp / TRAINABLE)
        if ema is not None:
            save_ema(ema, params, tmp / EMA)
        write_text_atomic(tmp / STATE, json.dumps(asdict(state), indent=2))
        fsync_tree(tmp)  # accelerate's files too: everything is on disk before the marker says so
        write_text_atomic(tmp / MARKER, time.strftime("%Y-%m-%dT%H:%M:%S"))
        if final.exists():  # a checkpoint of the same step from an earlier attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        rotate(root, keep_last)
    accelerator.wait_for_everyone()
    return final


def _full(p: torch.Tensor) -> torch.Tensor:
    """A whole tensor from a parameter that may be sharded (FSDP2 DTensor)."""
    p = p.detach()
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def rotate(root: Path, keep_last: int) -> None:
    done = complete_checkpoints(root)
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: p.name)


def _valid(path: Path) -> str | None:
    """None when the checkpoint looks whole, else what is wrong with it."""
    if not (path / MARKER).is_file():
        return "incomplete (no COMPLETE marker)"
    try:
        json.loads((path / STATE).read_text())
        with safe_open(str(path / TRAINABLE), framework="pt") as f:
            for key in f.keys():
                f.get_slice(key)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        return f"unreadable ({e})"
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type on a truncated file
        return f"unreadable ({type(e).__name__}: {e})"
    return None


def find_resume(output_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint to resume from: `latest` = newest whole one (damaged ones skipped with a warning)."""
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise UserError(f"train.resume '{resume}': no such checkpoint folder; use 'latest' or a step-* folder")
        problem = _valid(path)
        if problem:
            raise UserError(f"train.resume '{resume}': checkpoint is {problem}; pick another or use 'latest'")
        return path
    root = checkpoint_root(output_dir)
    candidates = sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: p.name) if root.is_dir() else []
    for path in reversed(candidates):
        problem = _valid(path)
        if problem is None:
            return path
        warnings.warn(f"skipping checkpoint {path}: {problem}", stacklevel=2)
    return None


def load_checkpoint(accelerator, path: Path, params, ema=None) -> TrainState:
    """Restore trained weights, optimizer, scheduler, RNG and the train state from a checkpoint."""
    accelerator.load_state(str(path))
    saved = load_file(str(path / TRAINABLE))
    missing = sorted(set(params) - set(saved))
    if missing:
        raise UserError(
            f"checkpoint {path} does not hold {len(missing)} trained tensors (e.g. {missing[0]}): "
            "it was written by a different method or recipe; start a new output_dir"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name].to(p.device, p.dtype))
    if ema is not None and (path / EMA).is_file():
        load_ema(ema, params, path / EMA)
    return TrainState(**json.loads((path / STATE).read_text()))


def save_ema(ema, params, path: Path) -> None:
    """EMAModel.state_dict(): the shadow tensors by parameter name, the rest (update count, decay) as JSON."""
    state = dict(ema.state_dict())
    shadow = dict(zip(params, state.pop("shadow_params"), strict=True))
    save_safetensors({k: _full(v) for k, v in shadow.items()}, path, metadata={"ema_state": json.dumps(state)})


def load_ema(ema, params, path: Path) -> None:
    """Back into EMAModel.load_state_dict: the update count too, so the decay continues where it was."""
    with safe_open(str(path), framework="pt") as f:
        state = json.loads((f.metadata() or {}).get("ema_state", "{}"))
    shadow = load_file(str(path))
    device = ema.shadow_params[0].device if ema.shadow_params else "cpu"
    state["shadow_params"] = [shadow[name].to(device, p.dtype) for name, p in params.items()]
    ema.load_state_dict(state)
