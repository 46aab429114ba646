"""Records (one captioned image each), subsets, and the bookkeeping of bad input.

A record carries what every later stage needs without touching the image again: its (h, w) after EXIF
orientation, a content digest (cache keys, fingerprint) and where its bytes live. Scanning reads each
file once, in a thread pool (hashing and PIL decoding release the GIL).
"""

from __future__ import annotations

import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from finetune.data.config import CaptionRules
from finetune.data.images import IMAGE_EXTS, BadImage, probe
from finetune.errors import DataError


@dataclass(frozen=True)
class Record:
    key: str  # what errors and batches name: a file path, 'toy:world#3', 'hf:user/set#12'
    caption: str  # before caption rules
    size: tuple[int, int]  # (h, w), upright
    digest: str  # hash of the encoded bytes
    path: str | None = None  # the bytes are read from here ...
    blob: bytes | None = field(default=None, repr=False)  # ... or kept here (toy, hf)
    mask: bytes | None = field(default=None, repr=False)  # a loss mask that came with the image (toy subjects)
    #: a video clip: its frames' indices in the source (None: an image). `media` says how the source is held:
    #: 'video' (a file PyAV decodes), 'frames' (a folder of frame images, `members` in order) or 'strip'
    #: (frames tiled left to right in `blob`, `total` of them: toy clips)
    clip: tuple[int, ...] | None = None
    media: str = "image"
    members: tuple[str, ...] = field(default=(), repr=False)
    total: int = 1

    @property
    def frames(self) -> int:
        """Frames in the clip (1 for an image)."""
        return len(self.clip) if self.clip is not None else 1

    def read(self) -> bytes:
        if self.blob is not None:
            return self.blob
        return Path(self.path).read_bytes()


@dataclass
class Subset:
    name: str
    kind: str  # the source type
    repeats: int
    rules: CaptionRules
    records: list[Record] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # things a user should know (not fatal)
    is_prior: bool = False
    preserve: bool = False  # a regularisation subset of base-prediction preservation (data.preservation)


@dataclass
class Problems:
    """Bad input policy: raise a DataError, or (on_bad_image: skip) warn once per file on stderr and count."""

    on_bad: str = "error"
    min_side: int = 64
    verbose: bool = True  # only the main process warns
    skipped: list[str] = field(default_factory=list)
    skip_hint: str = "set data.on_bad_image: skip"  # how this caller's user says 'skip' (a tool: its flag)

    def bad(self, where: str, why: str, fix: str) -> None:
        if self.on_bad != "skip":
            raise DataError(f"{where}: {why}; {fix} (or {self.skip_hint} to leave such files out)")
        self.skipped.append(f"{where}: {why}")
        if self.verbose:  # a plain line, not warnings.warn: users should not see our source lines
            print(f"warning: skipping {where}: {why}", file=sys.stderr)


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def read_caption(path: Path, probs: Problems) -> str | None:
    """A sidecar caption, whitespace-normalised; None (after reporting) when it is not UTF-8."""
    try:
        return " ".join(path.read_text(encoding="utf-8-sig").split())
    except UnicodeDecodeError:
        probs.bad(str(path), "caption file is not UTF-8 text", "re-save it as UTF-8")
        return None


def image_files(root: Path, recursive: bool = False, within: Path | None = None) -> list[Path]:
    """Image files under root (by extension), sorted for a stable order; hidden files are ignored.

    Links are followed only inside the dataset (`within`, default `root`): a link out of it is refused by
    name before the file is opened, as metadata `file_name`s are, so a dataset cannot pull in files its
    folder does not hold (a shared folder, a downloaded archive)."""
    pattern = "**/*" if recursive else "*"
    files = sorted(
        p for p in root.glob(pattern)
        if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".") and p.is_file()
    )
    for p in files:
        inside(p, within or root)
    return files


def inside(path: Path, root: Path) -> Path:
    """`path`, refused when it (through a link anywhere on its way) resolves outside `root`."""
    target = path.resolve()
    if not target.is_relative_to(root.resolve()):
        raise DataError(f"{path}: links to {target}, outside the dataset folder {root}; copy the file into the "
                        "folder, or point the source at where it lives (links out of a dataset are not followed)")
    return path


def need_dir(path: str, key: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: folder does not exist ({key}); check the path (relative paths start at {os.getcwd()})")
    if not p.is_dir():
        raise DataError(f"{p}: is a file, not a folder ({key}); point it at the folder holding the images")
    return p


def confined(root: Path, name: str, where: str) -> Path:
    """root/name, refusing absolute names and anything (symlinks included) that lands outside root."""
    if Path(name).is_absolute() or Path(name).drive:
        raise DataError(f"{where}: file_name '{name}' is an absolute path; give it relative to {root}")
    target = (root / name).resolve()
    if not target.is_relative_to(root.resolve()):
        raise DataError(f"{where}: file_name '{name}' points outside {root}; keep the images inside that folder")
    return root / name


def _load(path: Path) -> tuple[str, tuple[int, int]] | BadImage | OSError:
    try:
        data = path.read_bytes()
        return digest(data), probe(data)  # only the digest leaves: a large set must not sit in memory
    except (BadImage, OSError) as e:
        return e


def load_images(items: list[tuple[Path, str]], probs: Problems) -> list[Record]:
    """(path, caption) pairs -> records, reading and checking every image; bad ones go through `probs`."""
    workers = min(8, (os.cpu_count() or 1) + 2)
    with ThreadPoolExecutor(workers) as pool:
        loaded = list(pool.map(_load, [p for p, _ in items]))
    out = []
    for (path, caption), got in zip(items, loaded, strict=True):
        if isinstance(got, Exception):
            why = str(got) if isinstance(got, BadImage) else f"cannot be read ({got.strerror or got})"
            probs.bad(str(path), why, "replace or delete the file")
            continue
        hashed, size = got
        rec = Record(str(path), caption, size, hashed, path=str(path))
        if check_size(rec, probs):
            out.append(rec)
    return out


def check_size(rec: Record, probs: Problems) -> bool:
    h, w = rec.size
    if min(h, w) >= probs.min_side:
        return True
    probs.bad(
        rec.key,
        f"is {w}x{h}, smaller than the smallest bucket side {probs.min_side} px",
        "use a larger image, or lower data.resolution / data.buckets.min_side",
    )
    return False


def blob_record(key: str, caption: str, data: bytes, probs: Problems) -> Record | None:
    """A record for in-memory bytes (hf cells, toy drawings)."""
    try:
        size = probe(data)
    except BadImage as e:
        probs.bad(key, str(e), "fix or remove that row")
        return None
    rec = Record(key, caption, size, digest(data), blob=data)
    return rec if check_size(rec, probs) else None
