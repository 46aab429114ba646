"""Records (a captioned image and its conditioning images), subsets, and the bookkeeping of bad input.

A record carries what every later stage needs without touching the image again: its (h, w) after EXIF
orientation, a content digest (cache keys, fingerprint) and where its bytes live. Scanning reads each
file once, in a thread pool (hashing and PIL decoding release the GIL).
"""

from __future__ import annotations

import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from finetune.data.config import CaptionRules
from finetune.data.images import IMAGE_EXTS, BadImage, probe
from finetune.errors import DataError


@dataclass(frozen=True)
class ImageFile:
    """One image's bytes and what is known about them without decoding again."""

    key: str  # what errors name: a file path, 'toy:world#3', 'hf:user/set#12'
    size: tuple[int, int]  # (h, w), upright
    digest: str  # hash of the encoded bytes
    path: str | None = None  # the bytes are read from here ...
    blob: bytes | None = field(default=None, repr=False)  # ... or kept here (toy, hf)

    def read(self) -> bytes:
        if self.blob is not None:
            return self.blob
        return Path(self.path).read_bytes()


@dataclass(frozen=True)
class Conditioning(ImageFile):
    """A conditioning image of a record: 'spatial' (pixel-aligned with the target: an edit's input, a control
    map) or 'reference' (a subject or style picture, resized on its own); see data.conditioning."""

    role: str = "spatial"


@dataclass(frozen=True)
class Record(ImageFile):
    """One training example: a target image, its caption, and the conditioning images that travel with it."""

    caption: str = ""  # before caption rules
    mask: bytes | None = field(default=None, repr=False)  # a loss mask that came with the image (toy subjects)
    conditions: tuple[Conditioning, ...] = ()
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


def load_images(items: list[tuple[Path, str]], probs: Problems,
                controls: dict[Path, list[Path]] | None = None, role: str = "spatial") -> list[Record]:
    """(path, caption) pairs -> records, reading and checking every image; bad ones go through `probs`.
    `controls`: each target's conditioning files (paired data), read and checked the same way; a pair with a bad
    conditioning image is reported (and, skipping, left out whole). Whether they fit their target is
    `finetune.data.pairs.fitting`'s to say."""
    extra = [c for p, _ in items for c in (controls or {}).get(p, ())]
    workers = min(8, (os.cpu_count() or 1) + 2)
    with ThreadPoolExecutor(workers) as pool:
        loaded = list(pool.map(_load, [p for p, _ in items] + extra))
    got_of = dict(zip([p for p, _ in items] + extra, loaded, strict=True))
    out = []
    for path, caption in items:
        rec = _checked(path, got_of[path], probs, lambda key, h, size, c=caption: Record(key, size, h, path=key,
                                                                                          caption=c))
        if rec is not None and controls is not None:  # whether they fit it: finetune.data.pairs.fitting
            conds = [_checked(c, got_of[c], probs, lambda key, h, size: Conditioning(key, size, h, path=key,
                                                                                       role=role), pair=str(path))
                     for c in controls.get(path, ())]
            rec = None if None in conds else replace(rec, conditions=tuple(conds))
        if rec is not None:
            out.append(rec)
    return out


def _checked(path: Path, got, probs: Problems, make, pair: str | None = None):
    """The image read from `path` (made by `make(key, digest, size)`), or None after reporting it."""
    if isinstance(got, Exception):
        why = str(got) if isinstance(got, BadImage) else f"cannot be read ({got.strerror or got})"
        of = f" (the conditioning image of {pair})" if pair else ""
        probs.bad(str(path), why + of, "replace or delete the file" + (" or its pair" if pair else ""))
        return None
    hashed, size = got
    image = make(str(path), hashed, size)
    return image if pair is not None or check_size(image, probs) else None


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
    rec = Record(key, size, digest(data), blob=data, caption=caption)
    return rec if check_size(rec, probs) else None


def blob_condition(key: str, data: bytes, role: str, probs: Problems, pair: str) -> Conditioning | None:
    """A conditioning image held in memory (hf cells, toy drawings), or None after reporting it."""
    try:
        size = probe(data)
    except BadImage as e:
        probs.bad(key, f"{e} (the conditioning image of {pair})", "fix or remove that row")
        return None
    return Conditioning(key, size, digest(data), blob=data, role=role)
