"""Sources: turn each `data.sources` entry into subsets of records. PIL only, no torch.

One function per source type, registered in SCANNERS. A kohya tree gives one subset per `N_prompt`
folder (its own repeats and prompt); every other source gives one subset.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

from finetune.data.captions import apply_rules
from finetune.data.pairs import (
    column_values,
    fitting,
    folder_pairs,
    hf_condition_columns,
    metadata_controls,
    target_dir,
    with_conditions,
)
from finetune.data.records import (
    Problems,
    Record,
    Subset,
    blob_condition,
    blob_record,
    confined,
    image_files,
    inside,
    load_images,
    need_dir,
    read_caption,
)
from finetune.errors import DataError

_SIDECARS = (".txt", ".caption", ".cap", ".tags", ".json")


def _subset(src, data, probs: Problems, name: str | None = None, repeats: int | None = None) -> Subset:
    return Subset(
        name=name or src.name or getattr(src, "path", None) or f"toy:{src.subject}",
        kind=src.type,
        repeats=repeats or src.repeats,
        rules=data.caption_rules(src),
    )


def _with_captions(files: list[Path], ext: str, default: str, probs: Problems,
                   root: Path) -> tuple[list, list[Path]]:
    """(path, caption) pairs from same-stem sidecars; files without one get `default` and are listed. A
    caption file linking out of `root` is refused, like an image."""
    pairs, missing = [], []
    for f in files:
        side = f.with_suffix(ext)
        if not side.is_file():
            missing.append(f)
            pairs.append((f, default))
            continue
        text = read_caption(inside(side, root), probs)
        if text is not None:
            pairs.append((f, text))
    return pairs, missing


def _wrong_ext_hint(files: list[Path], ext: str) -> str | None:
    """The sidecar extension the images do have, when it is not the configured one."""
    found = Counter(
        alt for f in files for alt in _SIDECARS if alt != ext and f.with_suffix(alt).is_file()
    )
    return found.most_common(1)[0][0] if found else None


def _no_images(root: Path, recursive: bool) -> DataError:
    nested = not recursive and any(image_files(root, recursive=True))
    hint = "; the images are in sub-folders: set recursive: true" if nested else "; add .png/.jpg/.webp images"
    return DataError(f"{root}: no images found{hint}")


def _missing_note(sub: Subset, missing: list[Path], ext: str, fallback: str) -> None:
    """Counted after loading: a file the scan skipped (corrupt, too small) trains on nothing at all."""
    loaded = {r.path for r in sub.records}
    missing = [f for f in missing if str(f) in loaded]
    if missing:
        sub.notes.append(
            f"{len(missing)} image(s) without a {ext} caption train on {fallback}, e.g. {missing[0].name}"
        )


# ----------------------------------------------------------------------------------------------- sources
def scan_folder(src, data, probs: Problems, key: str) -> list[Subset]:
    root = need_dir(src.path, key)
    cond = data.conditioning
    images = target_dir(root, cond) if cond else root  # paired data: targets in target/, beside control/
    files = image_files(images, src.recursive, within=root)
    if not files:
        raise _no_images(images, src.recursive)
    controls = folder_pairs(root, files, cond, src.recursive, probs) if cond else None
    files = [f for f in files if controls is None or f in controls]
    sub = _subset(src, data, probs)
    pairs, missing = _with_captions(files, src.caption_ext, "", probs, root)
    if len(missing) == len(files):
        other = _wrong_ext_hint(files, src.caption_ext)
        if other:
            raise DataError(
                f"{root}: no {src.caption_ext} caption files, but the images have {other} captions; "
                f"set caption_ext: '{other}' in {key}"
            )
    sub.records = fitting(load_images(pairs, probs, controls, cond.role if cond else "spatial"), probs)
    template = apply_rules("", sub.rules)
    _missing_note(sub, missing, src.caption_ext,
                  f"the template alone ({template!r})" if template else "an empty caption")
    return [sub]


def scan_instance(src, data, probs: Problems, key: str) -> list[Subset]:
    root = need_dir(src.path, key)
    files = image_files(root)
    if not files:
        raise _no_images(root, False)
    sub = _subset(src, data, probs)
    pairs, _ = _with_captions(files, src.caption_ext, src.instance_prompt, probs, root)
    sub.records = load_images(pairs, probs)
    return [sub]


def scan_kohya(src, data, probs: Problems, key: str) -> list[Subset]:
    root = need_dir(src.path, key)
    dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    named = [d for d in dirs if re.fullmatch(r"\d+_.+", d.name)]
    if not named and (root / "img").is_dir():  # pointed at the project folder instead of its img/
        return scan_kohya(src.model_copy(update={"path": str(root / "img")}), data, probs, key)
    if not named:
        raise DataError(
            f"{root}: no kohya sub-folders named like '10_sks dog' (repeats_prompt); "
            "use type: folder for a flat folder of images"
        )
    subsets = []
    for d in named:
        count, prompt = d.name.split("_", 1)
        if int(count) < 1:
            raise DataError(f"{d}: repeats in the folder name must be at least 1; rename it to 1_{prompt}")
        files = image_files(d, within=root)  # repeats folders may link the same images between them
        if not files:
            raise DataError(f"{d}: kohya folder holds no images; add images or remove the folder")
        sub = _subset(src, data, probs, name=str(d), repeats=int(count) * src.repeats)
        pairs, missing = _with_captions(files, src.caption_ext, prompt, probs, root)
        sub.records = load_images(pairs, probs)
        _missing_note(sub, missing, src.caption_ext, f"the folder prompt {prompt!r}")
        subsets.append(sub)
    ignored = [d.name for d in dirs if d not in named]
    if ignored:
        subsets[0].notes.append(f"ignored sub-folders not named 'N_prompt': {', '.join(ignored[:5])}")
    return subsets


def _metadata_rows(path: Path) -> list[tuple[int, dict]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; re-save it as UTF-8") from None
    if path.suffix == ".csv":
        return [(i + 2, row) for i, row in enumerate(csv.DictReader(io.StringIO(text)))]
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not a JSON object ({e.msg}); one JSON object per line") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{i}: expected a JSON object like {{\"file_name\": ..., \"text\": ...}}")
        rows.append((i, row))
    return rows


def _metadata_file(src, root: Path) -> Path:
    names = [src.file] if src.file else ["metadata.jsonl", "metadata.csv"]
    for name in names:
        if (root / name).is_file():
            return confined(root, name, str(root))
    raise DataError(f"{root}: no {' or '.join(names)}; add one with file_name and {src.caption_column} columns")


def scan_metadata(src, data, probs: Problems, key: str) -> list[Subset]:
    root = need_dir(src.path, key)
    meta = _metadata_file(src, root)
    rows = _metadata_rows(meta)
    if not rows:
        raise DataError(f"{meta}: has no rows; add one line per image")
    pairs, cond = [], data.conditioning
    controls: dict[Path, list[Path]] | None = {} if cond else None
    for line, row in rows:
        where = f"{meta}:{line}"
        for col in ("file_name", src.caption_column):
            if col not in row:
                raise DataError(
                    f"{where}: no '{col}' column (columns: {', '.join(map(str, row))}); "
                    f"set caption_column in {key} or fix the file"
                )
        path = confined(root, str(row["file_name"]), where)
        if not path.is_file():
            probs.bad(f"{where}", f"file_name '{row['file_name']}' does not exist in {root}", "fix the row")
            continue
        if cond is not None:
            found = metadata_controls(row, cond, root, where, probs)
            if found is None:
                continue
            controls[path] = found
        caption = row[src.caption_column]
        pairs.append((path, " ".join(str(caption if caption is not None else "").split())))
    sub = _subset(src, data, probs)
    sub.records = fitting(load_images(pairs, probs, controls, cond.role if cond else "spatial"), probs)
    listed = {p for p, _ in pairs} | {c for cs in (controls or {}).values() for c in cs}
    unlisted = len(set(image_files(root, recursive=True)) - listed)
    if unlisted > 0:
        sub.notes.append(f"{unlisted} image(s) in {root} are not listed in {meta.name} and are not used")
    return [sub]


def _load_hf(src):
    import datasets

    local = Path(src.path)
    try:
        if local.is_dir() and any((local / f).is_file() for f in ("state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if src.split not in ds:
                    raise DataError(f"{local}: no split '{src.split}'; splits: {', '.join(ds)}")
                ds = ds[src.split]
            return ds
        return datasets.load_dataset(src.path, split=src.split, revision=src.revision)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (offline, missing split, bad files)
        raise DataError(
            f"{src.path}: could not load the dataset ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "check the name/path and split (offline runs need a local copy)"
        ) from None


def scan_hf(src, data, probs: Problems, key: str) -> list[Subset]:
    import datasets

    ds = _load_hf(src)
    for col in (src.image_column, src.caption_column):
        if col not in ds.column_names:
            raise DataError(
                f"{src.path}: no column '{col}' (columns: {', '.join(ds.column_names)}); "
                f"set image_column / caption_column in {key}"
            )
    cond = data.conditioning
    columns = [src.image_column, src.caption_column] + (hf_condition_columns(ds, cond, src.path) if cond else [])
    for col in columns[2:] + columns[:1]:
        ds = _undecoded(ds, col, datasets)
    if not len(ds):
        raise DataError(f"{src.path}: split '{src.split}' has no rows")
    sub = _subset(src, data, probs)
    for i, row in enumerate(ds.select_columns(columns)):
        rec = _hf_record(src, i, row, probs, cond)
        if rec is not None:
            sub.records.append(rec)
    return [sub]


def _undecoded(ds, col: str, datasets):
    """Keep a column's encoded bytes (an image, or a list of images): we decode ourselves (EXIF, modes, draft)
    and hash them for the caches."""
    feature = ds.features[col]
    if isinstance(feature, datasets.Image):
        return ds.cast_column(col, datasets.Image(decode=False))
    inner = getattr(feature, "feature", None)
    if isinstance(inner, datasets.Image):
        return ds.cast_column(col, type(feature)(datasets.Image(decode=False)))
    return ds


def _hf_bytes(cell, where: str, col: str, probs: Problems) -> bytes | None:
    if isinstance(cell, dict) and cell.get("bytes"):
        return cell["bytes"]
    if isinstance(cell, dict) and cell.get("path") or isinstance(cell, str):
        path = cell["path"] if isinstance(cell, dict) else cell
        try:
            return Path(path).read_bytes()
        except OSError as e:
            probs.bad(where, f"image file {path} cannot be read ({e.strerror})", "fix the dataset")
            return None
    probs.bad(where, f"column '{col}' holds no image", f"set the {col} column to an image column")
    return None


def _hf_record(src, i: int, row: dict, probs: Problems, cond=None) -> Record | None:
    where = f"hf:{src.path}#{i}"
    data = _hf_bytes(row[src.image_column], where, src.image_column, probs)
    if data is None:
        return None
    rec = blob_record(where, " ".join(str(row[src.caption_column] or "").split()), data, probs)
    if rec is None or cond is None:
        return rec
    conds = []
    for j, cell in enumerate(column_values(row, cond, where)):
        blob = _hf_bytes(cell, f"{where} ({cond.column} {j + 1})", cond.column, probs)
        c = None if blob is None else blob_condition(f"{where}/{cond.column}/{j + 1}", blob, cond.role, probs, where)
        if c is None:
            return None
        conds.append(c)
    return with_conditions(rec, conds, probs)


def scan_toy(src, data, probs: Problems, key: str) -> list[Subset]:
    if src.edits is not None:
        return [_toy_edits(src, data, probs)]
    sub = _subset(src, data, probs)
    for i, (png, caption, mask) in enumerate(_toy_drawn(src.subject, src.count, src.seed, src.variants, src.masks)):
        rec = blob_record(f"toy:{src.subject}#{i}", src.prompt if src.prompt is not None else caption, png, probs)
        if rec is not None:
            sub.records.append(replace(rec, mask=mask) if mask is not None else rec)
    return [sub]


@functools.lru_cache(maxsize=16)
def _toy_drawn(subject: str, count: int, seed: int, variants: bool, masks: bool) -> tuple:
    """((PNG bytes, caption, mask PNG or None), ...) of a toy source, drawn once per process: the training scan,
    the metrics' references and `--check` read the same source (drawing is most of a toy scan's time)."""
    from finetune.toy import world  # lazy: drawing code is only needed for toy runs

    if subject == "world":
        pairs = world.world_images(count, seed, variants=variants)
    else:
        pairs = world.subject_images(subject, count, seed)
    out = []
    for img, caption in pairs:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append((buf.getvalue(), caption, _toy_mask(img) if masks else None))
    return tuple(out)


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _toy_edits(src, data, probs: Problems) -> Subset:
    """Edit pairs of the toy world: the target, its input as conditioning, the instruction as caption."""
    from finetune.toy.edits import pairs

    if data.conditioning is None:
        raise DataError("toy edits are pairs: add data.conditioning (role: spatial) to train on them")
    sub = _subset(src, data, probs, name=src.name or f"toy:edits{' (held out)' if src.held_out else ''}")
    for i, p in enumerate(pairs(src.edits, src.count, src.seed, src.held_out)):
        key = f"toy:edits#{i}"
        rec = blob_record(key, src.prompt if src.prompt is not None else p.instruction.text, _png(p.target), probs)
        cond = blob_condition(f"{key}/input", _png(p.input), data.conditioning.role, probs, key)
        if rec is not None and cond is not None:
            sub.records.append(replace(rec, conditions=(cond,)))
    return sub


def _toy_mask(img) -> bytes:
    """The object's mask as PNG bytes: the toy scorer's saturation mask, grown by a pixel for the soft edge."""
    import numpy as np
    from PIL import Image, ImageFilter

    from finetune.toy.score import foreground

    mask = Image.fromarray((foreground(img) > 0.1).astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(3))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    return buf.getvalue()


SCANNERS = {
    "folder": scan_folder,
    "metadata": scan_metadata,
    "kohya": scan_kohya,
    "hf": scan_hf,
    "instance": scan_instance,
    "toy": scan_toy,
}


def _video_scanner(name: str):
    def scan(src, data, probs: Problems, key: str) -> list[Subset]:
        from finetune.data.video_sources import VIDEO_SCANNERS  # PyAV only where videos are read

        return VIDEO_SCANNERS[name](src, data, probs, key)

    return scan


SCANNERS |= {name: _video_scanner(name) for name in ("video", "frames", "toy_video")}
