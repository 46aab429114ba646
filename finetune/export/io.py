"""Atomic writes: a file appears complete or not at all, readable like any other file.

Every file the project writes (exports, model cards, checkpoints, caches, class images) goes through
`atomic_open`: a hidden temporary file in the destination folder, fsynced, then renamed into place. The
temporary file is created with mode 0666 minus the umask (0644 usually), as `open()` would, so a ComfyUI or
web server running as another user can read the result (`tempfile.mkstemp` would leave it 0600).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def __getattr__(name: str):
    """`DTYPES` ({'fp32': torch.float32, ...}) built on first use: importing this module must not load torch
    (tools that only write text, inspect_file.py reading a header)."""
    if name == "DTYPES":
        import torch

        globals()["DTYPES"] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        return globals()["DTYPES"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _temp_beside(path: Path) -> tuple[int, Path]:
    """Create a new hidden temporary file next to `path`; the umask applies to its mode."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path}: could not create a temporary file beside it")


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed to `path`, else removed.
    `durable=False` skips the fsync, for files whose reader detects a damaged one and makes it again (cache
    entries): the rename still means a reader never sees a half-written file while the machine runs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_beside(path)
    os.close(fd)
    try:
        yield tmp
        # the writer may have replaced our file with its own (safetensors does, with mode 0600)
        os.chmod(tmp, 0o666 & ~_umask())
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename == str(tmp) and e.errno is not None:  # name the file the user asked for, not our temp
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """`open(path, mode)` that writes a temporary file and renames it into place only on success."""
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as f:
        yield f


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` to `path` atomically."""
    from safetensors.torch import save_file

    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=meta or None)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a small text file (model card, recipe) atomically."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(path)


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
        import torch

        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is the user's file
            raise ModelError(f"{path}: cannot be read as a weights-only pickle ({str(e).splitlines()[0]})") from None
        data = data.get("state_dict", data) if isinstance(data, dict) else data
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise ModelError(f"{path}: pickle does not hold a flat dict of tensors")
        return check_finite(dict(data), path), {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"{path}: not a readable safetensors file (truncated or corrupt? {str(e).splitlines()[0]})") from None
    return check_finite(tensors, path), meta


def check_finite(tensors: dict[str, torch.Tensor], path: str | Path) -> dict[str, torch.Tensor]:
    """`tensors`, refused (one line naming the file and the first bad tensor) when a float tensor holds NaN or
    inf: merged, combined or sampled, one such value spreads into a NaN model or a black image."""
    import torch

    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            _refuse_nonfinite(path, name, int((~torch.isfinite(t)).sum()))
    return tensors


def _refuse_nonfinite(path, name: str, count: int) -> None:
    from finetune.errors import ModelError

    raise ModelError(f"{path}: tensor '{name}' holds {count} NaN/inf value(s) (a diverged or damaged file); "
                     "use an earlier checkpoint or re-export it")


def read_header_tensors(path: str | Path, allow_pickle: bool = False):
    """`read_tensors` without torch for a safetensors file: header tensors (names, shapes, dtypes; values read on
    demand, finetune/export/header.py), NaN/inf refused the same way. Pickle files need torch: read_tensors."""
    from finetune.export.header import first_nonfinite, read_header

    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES or not path.is_file():
        return read_tensors(path, allow_pickle)
    tensors, meta = read_header(path)
    bad = first_nonfinite(tensors)
    if bad is not None:
        _refuse_nonfinite(path, *bad)
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


# --------------------------------------------------------------------------------- no-clobber writes, moves
def _is_input(out: Path, src: Path, folder: bool) -> bool:
    """Whether writing `out` would replace the input `src`: the same file (links included), a file inside an
    input folder, or (`folder`: `out` is a folder replaced as a whole) a folder holding the input."""
    try:
        if out.exists() and src.exists() and os.path.samefile(out, src):
            return True
    except OSError:
        pass
    out, src = out.resolve(), src.resolve()
    return out == src or (src.is_dir() and out.is_relative_to(src)) or (folder and src.is_relative_to(out))


def check_output(out: str | Path, inputs=(), overwrite: bool = False, flag: str = "--out",
                 folder: bool = False) -> Path:
    """`out` when a tool may write it: never an input (not even with --overwrite), and never an existing file
    or (`folder`) folder unless `overwrite`. Called before heavy work: a refusal costs and changes nothing."""
    from finetune.errors import ModelError

    out = Path(out)
    for src in inputs:
        if src is not None and _is_input(out, Path(src), folder):
            raise ModelError(f"{out}: {flag} would replace the input {src}; choose another {flag}")
    if out.exists() or out.is_symlink():
        if not folder and out.is_dir():
            raise ModelError(f"{out}: is a folder, not a file; choose another {flag}")
        if not overwrite:
            raise ModelError(f"{out}: already exists; choose another {flag} or pass --overwrite to replace it")
    return out

def write_text_new(path: str | Path, text: str) -> Path:
    """Write a small text file atomically under a name that must not exist yet (see write_bytes_new)."""
    return write_bytes_new(path, text.encode("utf-8"))


def write_bytes_new(path: str | Path, data: bytes) -> Path:
    """Write a file atomically under a name that must not exist yet: FileExistsError when it does, even when it
    appears while we write (the finished temporary file is hard-linked into place, and a hard link fails on an
    existing name). The file's mode follows the umask, like any new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _link_new(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _link_new(src: Path, dst: Path) -> None:
    """Give `src` the new name `dst` without ever replacing a file there; `src` may keep its name too.
    Filesystems without hard links (FAT, some network shares) fall back to check-then-rename, which
    leaves a short race."""
    import errno

    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:
        if dst.exists() or dst.is_symlink():
            raise FileExistsError(errno.EEXIST, "file exists", str(dst)) from None
        os.replace(src, dst)


def move_no_clobber(src: str | Path, dst: str | Path) -> Path:
    """Move a file to a new name, never replacing a file there (FileExistsError) and never losing it: the
    new name exists before the old one goes; across filesystems the bytes are copied and synced first."""
    import secrets
    import shutil

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:  # another filesystem, or no hard links there: copy beside the target, then link it in
        tmp = dst.parent / f".{dst.name}.{secrets.token_hex(4)}.tmp"
        try:
            shutil.copy2(src, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            _link_new(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
    os.unlink(src)
    return dst


def replace_folder(tmp: str | Path, out: str | Path) -> Path:
    """Put a fully written folder `tmp` in the place of `out` (kept as `<out>.old` until the rename is done), so
    `out` is always either the old folder or the new one, never half of either."""
    import shutil

    tmp, out = Path(tmp), Path(out)
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out
