"""Checkpoints you can trust.

A checkpoint is a folder `checkpoints/step-NNNNNN/` holding
  trainable.safetensors   every trained parameter, by module-qualified name (the frozen base is not copied)
  ema.safetensors         the EMA shadow weights by parameter name, its update count and settings in the
                          header (diffusers' EMAModel.state_dict), when EMA is on
  accelerate files        optimizer, LR scheduler, grad scaler and every process's RNG (accelerate.save_state)
  trainer_state.json      step, epoch, position in the epoch, dataset and recipe fingerprints
  files.json              size and sha256 of every file above, so a file damaged later is noticed on resume
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
from finetune.train.distributed import gather, load_into

MARKER = "COMPLETE"
STATE = "trainer_state.json"
TRAINABLE = "trainable.safetensors"
EMA = "ema.safetensors"
MANIFEST = "files.json"


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
    # optimizer, scheduler, scaler, RNG of every process (models skipped; under FSDP accelerate also writes
    # the sharded model and gathers or shards the optimizer state as its fsdp_state_dict_type says)
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    main = accelerator.is_main_process
    whole = gather(params, main)  # every process: gathering a sharded tensor is a collective
    if main:
        save_safetensors(whole, tmp / TRAINABLE)
        if ema is not None:
            save_ema(ema, params, tmp / EMA)
        write_text_atomic(tmp / STATE, json.dumps(asdict(state), indent=2))
        write_text_atomic(tmp / MANIFEST, json.dumps(_manifest(tmp), indent=1))
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


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(folder: Path) -> dict[str, list]:
    """[size, sha256] of every file of a checkpoint (accelerate's optimizer and RNG files included)."""
    return {str(p.relative_to(folder)): [p.stat().st_size, _sha256(p)] for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (MARKER, MANIFEST)}


def _damaged(path: Path) -> str | None:
    """What differs from the manifest written with the checkpoint (None for older checkpoints without one)."""
    if not (path / MANIFEST).is_file():
        return None
    for name, (size, digest) in json.loads((path / MANIFEST).read_text()).items():
        f = path / name
        if not f.is_file():
            return f"missing {name}"
        if f.stat().st_size != size or _sha256(f) != digest:
            return f"damaged: {name} differs from what was written ({f.stat().st_size} of {size} bytes)"
    return None


def _valid(path: Path) -> str | None:
    """None when every file of the checkpoint is as written, else what is wrong with it."""
    if not (path / MARKER).is_file():
        return "incomplete (no COMPLETE marker)"
    try:
        damage = _damaged(path)
        if damage:
            return damage
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
    try:
        accelerator.load_state(str(path))
    except Exception as e:  # noqa: BLE001 - torch/accelerate raise many types on a damaged or foreign file
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"checkpoint {path}: cannot be restored ({type(e).__name__}: {first}); pick an earlier "
                        "one with train.resume=<its folder>, or start a new train.output_dir") from None
    saved = load_file(str(path / TRAINABLE))
    missing = sorted(set(params) - set(saved))
    if missing:
        raise UserError(
            f"checkpoint {path} does not hold {len(missing)} trained tensors (e.g. {missing[0]}): "
            "it was written by a different method or recipe; start a new output_dir"
        )
    for name, p in params.items():
        load_into(p, saved[name])
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
