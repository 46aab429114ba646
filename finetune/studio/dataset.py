"""The data page: folders under the root, images with their captions, caption edits, and the scan.

The scan is `finetune.data.scan.scan_data` on a one-folder `data:` section (with on_bad_image: skip, so every
problem is listed instead of the first one stopping it) and its `--check` summary, plus the same caption
statistics `--check` prints. Caption edits write the `.txt` sidecar atomically and never touch the image.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from finetune.data.buckets import describe
from finetune.data.config import DataSection
from finetune.data.images import IMAGE_EXTS, BadImage, decode, probe
from finetune.data.scan import scan_data, summarize
from finetune.data.stats import caption_stats
from finetune.errors import DataError, UserError
from finetune.studio.paths import PathError, confine, inside, refuse_links_out, relative, short

MAX_CAPTION_CHARS = 20_000
CAPTION_EXTS = (".txt", ".caption")  # the only files a caption write creates: text no program runs or imports
FORMATS = {"PNG": (".png",), "JPEG": (".jpg", ".jpeg"), "WEBP": (".webp",), "BMP": (".bmp",), "GIF": (".gif",),
           "TIFF": (".tif", ".tiff")}  # what an uploaded image's bytes must be, by the extension of its name


def check_caption_ext(value: object) -> str:
    """A request's caption extension, from the allow-list (a recipe's caption_ext is one of these, or the
    data page cannot write it)."""
    if value not in CAPTION_EXTS:
        shown = value if isinstance(value, str) and len(value) <= 16 else type(value).__name__
        raise UserError(f"caption_ext: '{shown}' is not a caption extension; use one of {', '.join(CAPTION_EXTS)}")
    return value


def _caption_path(image: Path, ext: object) -> Path:
    return image.with_suffix(check_caption_ext(ext))


def _writable_caption(root: Path, side: Path) -> None:
    """A caption may replace a caption file, nothing else: not a link, not a folder, not a device."""
    if os.path.islink(side) or (side.exists() and not inside(root, side)):
        raise PathError(f"caption: '{side.name}' is a link; replace it with a plain file first")
    if os.path.lexists(side) and not side.is_file():
        raise UserError(f"caption: '{side.name}' exists and is not a caption file; nothing was written")


def list_folders(root: Path, rel: str) -> dict[str, Any]:
    """Sub-folders of root/rel that stay inside the root, and how many images each holds directly."""
    folder = confine(root, rel, "folder")
    if not folder.is_dir():
        raise DataError(f"folder: '{rel}' is not a folder under the studio root")
    subs = []
    for child in sorted(folder.iterdir()):
        if child.name.startswith(".") or not child.is_dir() or not inside(root, child):
            continue
        n = sum(1 for p in child.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        subs.append({"path": relative(root, child), "name": child.name, "images": n})
    parent = relative(root, folder.parent) if folder != root else None
    return {"path": relative(root, folder), "parent": parent, "folders": subs}


def folder_images(root: Path, rel: str, caption_ext: str = ".txt") -> dict[str, Any]:
    """Every image directly in the folder with its caption; links that leave the root are named, not read."""
    check_caption_ext(caption_ext)
    folder = confine(root, rel, "folder")
    if not folder.is_dir():
        raise DataError(f"folder: '{rel}' is not a folder under the studio root")
    images, outside = [], []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.suffix.lower() not in IMAGE_EXTS:
            continue
        if not inside(root, p):
            outside.append(p.name)
            continue
        if not p.is_file():
            continue
        side = _caption_path(p, caption_ext)
        caption, has = "", False
        if side.is_file() and inside(root, side):
            has = True
            with side.open("rb") as f:  # a caption is short: a huge file is not read whole
                caption = f.read(4 * MAX_CAPTION_CHARS).decode("utf-8-sig", errors="replace")
        images.append({"path": relative(root, p), "name": p.name, "caption": caption, "has_caption": has})
    return {"path": relative(root, folder), "images": images, "outside_root": outside}


def save_caption(root: Path, image_rel: str, text: str, caption_ext: str = ".txt") -> dict[str, Any]:
    """Write the image's caption sidecar atomically (temp file + rename); the image is only checked."""
    from finetune.export.io import write_text_atomic

    image = confine(root, image_rel, "image")
    if image.suffix.lower() not in IMAGE_EXTS or not image.is_file():
        raise DataError(f"image: '{image_rel}' is not an image file under the studio root")
    if not isinstance(text, str) or len(text) > MAX_CAPTION_CHARS:
        raise UserError(f"caption: must be text of at most {MAX_CAPTION_CHARS} characters")
    side = _caption_path(image, caption_ext)
    _writable_caption(root, side)
    write_text_atomic(side, text.strip() + "\n")
    return {"path": relative(root, side), "caption": text.strip()}


def upload(root: Path, folder: Path, name: str, data: bytes) -> dict[str, Any]:
    """A new file in `folder` (confined, existing): an image its bytes prove to be, or a caption beside one."""
    from finetune.export.io import write_bytes_new

    ext = Path(name).suffix.lower()
    if ext in CAPTION_EXTS:
        _check_caption_upload(folder, name, data)
    elif ext in IMAGE_EXTS:
        _check_image_upload(name, ext, data)
    else:
        raise UserError(f"name: '{name}': only images ({', '.join(sorted(IMAGE_EXTS))}) and captions "
                        f"({', '.join(CAPTION_EXTS)}) beside them")
    try:
        write_bytes_new(folder / name, data)  # the umask sets its mode; an existing name is never replaced
    except FileExistsError:
        raise UserError(f"name: '{name}' already exists in that folder; nothing was overwritten") from None
    return {"path": relative(root, folder / name), "bytes": len(data)}


def _check_image_upload(name: str, ext: str, data: bytes) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        probe(data)
        kind = Image.open(io.BytesIO(data)).format
    except (BadImage, UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"{name}: not an image ({str(e).splitlines()[0] if str(e) else 'unreadable'})") from None
    if ext not in FORMATS.get(kind or "", ()):
        raise UserError(f"{name}: the bytes are a {kind or 'unknown'} image, not what '{ext}' says; rename it")


def _check_caption_upload(folder: Path, name: str, data: bytes) -> None:
    stem = Path(name).stem
    if not any((folder / f"{stem}{e}").is_file() for e in sorted(IMAGE_EXTS | {e.upper() for e in IMAGE_EXTS})):
        raise UserError(f"{name}: a caption goes beside its image, and that folder has no image named {stem}; "
                        "upload the image first")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{name}: not UTF-8 text; a caption is text") from None
    if len(text) > MAX_CAPTION_CHARS or "\x00" in text:
        raise UserError(f"{name}: a caption is text of at most {MAX_CAPTION_CHARS} characters")


def thumbnail(root: Path, image_rel: str, size: int = 256) -> bytes:
    """A PNG (or the original bytes when size is 0) of an image under the root."""
    image = confine(root, image_rel, "image")
    if image.suffix.lower() not in IMAGE_EXTS or not image.is_file():
        raise DataError(f"image: '{image_rel}' is not an image file under the studio root")
    data = image.read_bytes()
    if size <= 0:
        return data
    try:
        img = decode(data)
    except BadImage as e:
        raise DataError(f"image: '{image_rel}' {e}") from None
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def scan_folder(root: Path, rel: str, resolution: int = 512, buckets: bool = True, caption_ext: str = ".txt",
                recursive: bool = False) -> dict[str, Any]:
    """The `--check` view of one folder: bucket plan, problems, caption statistics, the summary text."""
    folder = confine(root, rel, "folder")
    if not folder.is_dir():
        raise DataError("folder: not a folder under the studio root")
    refuse_links_out(root, folder, "folder", "the scan")
    src = {"type": "folder", "path": str(folder), "caption_ext": check_caption_ext(caption_ext),
           "recursive": recursive}
    data = DataSection.model_validate({"sources": [src], "resolution": resolution,
                                       "buckets": {"enabled": buckets}, "on_bad_image": "skip"})
    scan = scan_data(data, verbose=False)
    stats = caption_stats(scan.subsets, data.caption.separator)
    notes = [n for s in scan.subsets for n in s.notes]
    return {
        "images": scan.num_images,
        "buckets": [{"width": w, "height": h, "images": n}
                    for (h, w), n in sorted(scan.bucket_counts().items(), key=lambda kv: -kv[1])],
        "bucket_plan": describe(scan.bucket_counts()),
        "skipped": [short(root, s) for s in scan.problems.skipped],
        "notes": notes,
        "duplicates": [[short(root, k) for k in g] for g in stats.duplicates],
        "stats": {"images": stats.images, "captioned": stats.images - stats.empty, "empty": stats.empty,
                  "words_min": stats.words_min, "words_median": stats.words_median, "words_max": stats.words_max,
                  "top_tags": stats.top_tags},
        "summary": short(root, summarize(scan)),
    }
