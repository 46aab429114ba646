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
from finetune.data.images import IMAGE_EXTS, BadImage, decode
from finetune.data.scan import scan_data, summarize
from finetune.data.stats import caption_stats
from finetune.errors import DataError, UserError
from finetune.studio.paths import PathError, confine, inside, links_out, relative

MAX_CAPTION_CHARS = 20_000


def _caption_path(image: Path, caption_ext: str) -> Path:
    if not caption_ext.startswith(".") or "/" in caption_ext or "\\" in caption_ext or len(caption_ext) > 16:
        raise UserError(f"caption_ext: '{caption_ext}' is not a file extension like '.txt'")
    return image.with_suffix(caption_ext)


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
            caption = side.read_text(encoding="utf-8-sig", errors="replace")
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
    if os.path.islink(side) or (side.exists() and not inside(root, side)):
        raise PathError(f"caption: '{side.name}' is a link; replace it with a plain file first")
    write_text_atomic(side, text.strip() + "\n")
    return {"path": relative(root, side), "caption": text.strip()}


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
    escaping = links_out(root, folder) if folder.is_dir() else []
    if escaping:
        raise PathError(f"folder: {', '.join(escaping)} lead(s) outside the studio root; the scan would read "
                        "them: copy the files in, or remove the links")
    src = {"type": "folder", "path": str(folder), "caption_ext": caption_ext, "recursive": recursive}
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
        "skipped": [_short(root, s) for s in scan.problems.skipped],
        "notes": notes,
        "duplicates": [[_short(root, k) for k in g] for g in stats.duplicates],
        "stats": {"images": stats.images, "captioned": stats.images - stats.empty, "empty": stats.empty,
                  "words_min": stats.words_min, "words_median": stats.words_median, "words_max": stats.words_max,
                  "top_tags": stats.top_tags},
        "summary": _short(root, summarize(scan)),
    }


def _short(root: Path, text: str) -> str:
    """Messages name files by absolute path; the browser knows them relative to the root."""
    return text.replace(str(root) + os.sep, "")
