"""Atomic, durable writes (a file appears complete or not at all, and is on disk before we say so), safe
file names, and the one dtype table of the exports."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` to `path` via a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(clean, tmp, metadata=meta or None)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a small text file (model card, recipe) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def fsync_tree(root: str | Path) -> None:
    """Flush every file under `root`, and the folders holding them, to disk (before a marker says 'complete')."""
    root = Path(root)
    for path in sorted(root.rglob("*")) + [root]:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass  # some filesystems cannot fsync a folder; the files themselves were flushed
        finally:
            os.close(fd)


def safe_stem(text: str, what: str) -> str:
    """`text` as a plain file stem, refused (one line, naming `what`) when it could leave its folder:
    a path separator, '..', a leading '.', '~' or a NUL, or nothing at all."""
    from finetune.errors import ModelError

    bad = (not text or text.strip() in (".", "..") or any(c in text for c in "/\\\0")
           or text.startswith((".", "~")) or (len(text) > 1 and text[0].isalpha() and text[1] == ":"))
    if bad:
        raise ModelError(f"{what} {text!r} is not a plain file name (no folders, no leading '.' or '~'); "
                         "choose another name")
    return text


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def read_tensors(path: str | Path, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a weights file; a clear UserError for anything we cannot read.

    Pickle files (.ckpt/.pt/.bin) run code when loaded: refused unless `allow_pickle`, then read with
    `torch.load(weights_only=True)`, which unpickles tensors and plain containers only.
    """
    from finetune.errors import ModelError

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ModelError(f"{path}: pickle file, which can run code when loaded; convert it to .safetensors "
                             "or pass --allow-pickle to read it with weights_only=True")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is the user's file
            raise ModelError(f"{path}: cannot be read as a weights-only pickle ({str(e).splitlines()[0]})") from None
        data = data.get("state_dict", data) if isinstance(data, dict) else data
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise ModelError(f"{path}: pickle does not hold a flat dict of tensors")
        return dict(data), {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"{path}: not a readable safetensors file (truncated or corrupt? {str(e).splitlines()[0]})") from None
    return tensors, meta


def read_metadata(path: str | Path) -> dict[str, str]:
    """Only the header of a safetensors file (cheap); {} for other files."""
    from safetensors import SafetensorError, safe_open

    from finetune.errors import ModelError

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
