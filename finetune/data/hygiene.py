"""Dataset hygiene: what in a folder of captioned images will hurt training, found before training does.

    report = check_folder("photos/", HygieneOptions(resolution=1024))
    print(format_report(report))
    quarantine(report)            # finetune.data.quarantine: moves offenders aside, never deletes

Checks: unreadable images, exact duplicates (same bytes), near duplicates (perceptual hashes confirmed by
thumbnails: re-encoded, resized or re-saved copies), images the training resolution must upscale, extreme
aspect ratios, missing / empty / non-UTF-8 captions, and captions longer than the text encoder's window
(counted with the base's own tokenizer, with the words that fall off). PIL + numpy; the tokenizer loads only
when there are captions to measure.
"""

from __future__ import annotations

import math
import os
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from finetune.data.images import BadImage, decode, probe
from finetune.data.phash import dhash, near_duplicates, phash, thumbnail
from finetune.data.records import digest, image_files, need_dir
from finetune.errors import DataError

# The order a file's problems are ranked in: it is quarantined under the first one.
KINDS = ("unreadable", "duplicate", "near-duplicate", "small", "aspect", "long-caption", "bad-caption",
         "empty-caption", "no-caption")
# What --fix moves by default; a missing or empty caption is fixed by captioning, not by moving the image.
FIXABLE = ("unreadable", "duplicate", "near-duplicate", "small", "aspect", "long-caption", "bad-caption")


@dataclass(frozen=True)
class HygieneOptions:
    resolution: int = 512  # training resolution: images with fewer than resolution^2 pixels get upscaled
    max_aspect: float = 2.5  # long side / short side beyond this is reported
    near_rms: float = 10.0  # thumbnail RMS difference (of 255) under which look-alikes are near duplicates; 0: off
    tokenizer: str = "toy"  # measures captions: 'toy', a diffusers base (folder or hub id) or a tokenizer folder
    max_tokens: int | None = None  # the text window; None: the tokenizer's own (77 for CLIP)
    caption_ext: str = ".txt"
    recursive: bool = False

    def check(self) -> None:
        if self.resolution < 8:
            raise DataError(f"--resolution {self.resolution}: give the training resolution, e.g. 512 or 1024")
        if self.max_aspect < 1:
            raise DataError(f"--max-aspect {self.max_aspect}: must be at least 1 (long side / short side)")
        if self.max_tokens is not None and self.max_tokens < 3:
            raise DataError(f"--max-tokens {self.max_tokens}: must be at least 3")


@dataclass(frozen=True)
class Finding:
    kind: str  # one of KINDS
    path: str  # the image
    detail: str  # what is wrong, in words, with numbers
    other: str | None = None  # duplicates: the image that is kept


@dataclass
class HygieneReport:
    folder: str
    images: int
    window: int | None  # the caption token window used (None: no captions measured)
    options: HygieneOptions
    findings: list[Finding] = field(default_factory=list)

    def by_kind(self) -> dict[str, list[Finding]]:
        out: dict[str, list[Finding]] = {k: [] for k in KINDS}
        for f in self.findings:
            out[f.kind].append(f)
        return {k: v for k, v in out.items() if v}

    def offenders(self, kinds=FIXABLE) -> dict[str, Finding]:
        """image path -> the finding it is quarantined under (its first in KINDS order among `kinds`)."""
        rank = {k: i for i, k in enumerate(KINDS)}
        out: dict[str, Finding] = {}
        for f in sorted(self.findings, key=lambda f: rank[f.kind]):
            if f.kind in kinds:
                out.setdefault(f.path, f)
        return out

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Image:
    path: Path
    size: tuple[int, int] = (0, 0)  # (h, w) upright
    digest: str = ""
    phash: int = 0
    dhash: int = 0
    thumb: np.ndarray | None = None
    error: str | None = None

    @property
    def pixels(self) -> int:
        return self.size[0] * self.size[1]


def _inspect(path: Path) -> _Image:
    try:
        data = path.read_bytes()
        size = probe(data)
        img = decode(data, need=(32, 32))  # JPEGs decode at a fraction of their size: hashes need 32 px
    except BadImage as e:
        return _Image(path, error=str(e))
    except OSError as e:
        return _Image(path, error=f"cannot be read ({e.strerror or e})")
    return _Image(path, size, digest(data), phash(img), dhash(img), thumbnail(img))


def inspect_images(files: list[Path], progress: bool = False) -> list[_Image]:
    """Read, check and hash every image in a thread pool (decoding and hashing release the GIL); `progress`: a
    bar on stderr (a large folder takes minutes)."""
    from tqdm.auto import tqdm

    with ThreadPoolExecutor(min(8, (os.cpu_count() or 1) + 2)) as pool:
        return list(tqdm(pool.map(_inspect, files), total=len(files), desc="reading images", unit="img",
                         disable=not progress, file=sys.stderr, leave=False))


# -------------------------------------------------------------------------------------------- the checks
def check_folder(folder: str | Path, options: HygieneOptions | None = None, progress: bool = False) -> HygieneReport:
    """Every check over one folder (the studio and tools/dataset.py both call this). Reads; writes nothing."""
    opts = options or HygieneOptions()
    opts.check()
    root = need_dir(str(folder), "the FOLDER argument")
    files = image_files(root, opts.recursive)
    if not files:
        raise DataError(f"{root}: no images found" + ("" if opts.recursive else " (pass --recursive for sub-folders)"))
    images = inspect_images(files, progress)
    good = [im for im in images if im.error is None]
    captions = {im.path: _read_caption(im.path.with_suffix(opts.caption_ext)) for im in images}
    findings = [Finding("unreadable", str(im.path), im.error) for im in images if im.error]
    findings += _duplicates(good, captions, opts.near_rms)
    findings += _geometry(good, opts)
    caption_findings, window = _captions(images, captions, opts)
    findings += caption_findings
    return HygieneReport(str(root), len(images), window, opts, findings)


def _read_caption(path: Path) -> str | None | UnicodeDecodeError:
    if not path.is_file():
        return None
    try:
        return " ".join(path.read_text(encoding="utf-8-sig").split())
    except UnicodeDecodeError as e:
        return e


def _keeper(group: list[_Image], captions) -> _Image:
    """Of look-alikes keep the largest, then one with a caption, then the first by name."""
    return min(group, key=lambda im: (-im.pixels, not isinstance(captions[im.path], str) or not captions[im.path],
                                      str(im.path)))


def _duplicates(good: list[_Image], captions, near_rms: float) -> list[Finding]:
    out, groups = [], defaultdict(list)
    for im in good:
        groups[im.digest].append(im)
    reps = []
    for group in groups.values():
        keep = _keeper(group, captions)
        reps.append(keep)
        out += [Finding("duplicate", str(im.path), f"same bytes as {_rel(keep.path, im.path)}", str(keep.path))
                for im in group if im is not keep]
    if near_rms <= 0 or len(reps) < 2:
        return out
    reps.sort(key=lambda im: str(im.path))
    pairs = near_duplicates([r.phash for r in reps], [r.dhash for r in reps], [r.thumb for r in reps],
                            max_rms=near_rms)
    for group in _connected(len(reps), pairs):
        members = [reps[i] for i in group]
        keep = _keeper(members, captions)
        rms = {(i, j): d for i, j, d in pairs}
        for i in group:
            im = reps[i]
            if im is keep:
                continue
            k = reps.index(keep)
            d = rms.get((min(i, k), max(i, k)))
            how = f"thumbnail RMS difference {d:.1f}/255" if d is not None else "through a chain of look-alikes"
            out.append(Finding("near-duplicate", str(im.path),
                               f"looks like {_rel(keep.path, im.path)} ({im.size[1]}x{im.size[0]} vs "
                               f"{keep.size[1]}x{keep.size[0]}, {how})", str(keep.path)))
    return out


def _connected(n: int, pairs) -> list[list[int]]:
    """Groups of indices joined by pairs (union-find), only groups of two or more."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, _ in pairs:
        parent[root(i)] = root(j)
    groups = defaultdict(list)
    for i in range(n):
        groups[root(i)].append(i)
    return [g for g in groups.values() if len(g) > 1]


def _geometry(good: list[_Image], opts: HygieneOptions) -> list[Finding]:
    out = []
    for im in good:
        h, w = im.size
        scale = opts.resolution / math.sqrt(h * w)
        if scale > 1:  # bucketing trains on ~resolution^2 pixels: fewer means the image is blown up
            out.append(Finding("small", str(im.path),
                               f"{w}x{h}: training at {opts.resolution} upscales it x{scale:.2f}"))
        aspect = max(h, w) / min(h, w)
        if aspect > opts.max_aspect:
            lost = 1 - opts.max_aspect / aspect
            out.append(Finding("aspect", str(im.path), f"{w}x{h} is {aspect:.2f}:1, beyond {opts.max_aspect:g}:1; "
                               f"a {opts.max_aspect:g}:1 bucket crops away at least {lost:.0%} of it"))
    return out


def _captions(images: list[_Image], captions, opts: HygieneOptions) -> tuple[list[Finding], int | None]:
    out, texts = [], {}
    ext = opts.caption_ext
    for im in images:
        cap = captions[im.path]
        if im.error:  # an unreadable image is reported as such; its caption does not matter
            continue
        if cap is None:
            out.append(Finding("no-caption", str(im.path), f"no {ext} file next to it"))
        elif isinstance(cap, UnicodeDecodeError):
            out.append(Finding("bad-caption", str(im.path), f"{im.path.with_suffix(ext).name} is not UTF-8 text"))
        elif not cap:
            out.append(Finding("empty-caption", str(im.path), f"{im.path.with_suffix(ext).name} is empty"))
        else:
            texts[im.path] = cap
    if not texts:
        return out, None
    from finetune.data.tokens import load_tokenizer, overflow

    tok, window = load_tokenizer(opts.tokenizer, opts.max_tokens)
    for path, text in texts.items():
        n, lost, tail = overflow(tok, text, window)
        if lost > 0:
            tail = tail if len(tail) <= 60 else tail[:57] + "..."
            out.append(Finding("long-caption", str(path), f"{n} tokens: the last {lost} fall past the {window}-token "
                               f"window and are never seen: {tail!r}"))
    return out, window


def _rel(path: Path, seen_from: Path) -> str:
    return path.name if path.parent == seen_from.parent else str(path)


# ------------------------------------------------------------------------------------------------ report
def format_report(report: HygieneReport, fix_kinds=FIXABLE, quarantine_dir: str | None = None) -> str:
    """The text tools/dataset.py prints: a headline, each problem kind with its files, what --fix would do."""
    kinds = report.by_kind()
    bad = len({f.path for f in report.findings})
    o = report.options
    window = f", caption window {report.window} tokens" if report.window else ""
    lines = [f"{report.folder}: {report.images} images, {len(report.findings)} problem(s) in {bad} image(s) "
             f"(resolution {o.resolution}, max aspect {o.max_aspect:g}:1{window})"]
    for kind, items in kinds.items():
        lines.append(f"{kind} ({len(items)}):")
        lines += [f"  {Path(f.path).name}: {f.detail}" for f in items[:50]]
        if len(items) > 50:
            lines.append(f"  ... and {len(items) - 50} more")
    movable = report.offenders(fix_kinds)
    if movable:
        where = quarantine_dir or "the quarantine folder"
        lines.append(f"--fix moves {len(movable)} image(s) and their captions to {where} "
                     f"({', '.join(k for k in kinds if k in fix_kinds)}); nothing is deleted")
    if kinds.get("no-caption") or kinds.get("empty-caption"):
        lines.append(f"missing captions: python tools/caption.py {report.folder} writes them "
                     "(--fill-empty for empty files)")
    return "\n".join(lines)
