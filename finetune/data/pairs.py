"""Paired data (data.conditioning): which conditioning images belong to which target, and the checks on them.

Three layouts name the pairs:

- a folder source holds `target/` (images and captions) beside `control/` (or `control_1/`, `control_2/`, ... for
  several conditioning images), matched by file stem (and sub-folder, with `recursive`), as kohya, musubi-tuner
  and ai-toolkit lay out edit pairs;
- a metadata file gives each row a `control_image` column (a path, or a list of paths), or `control_image_1`,
  `control_image_2`, ... columns;
- a datasets table gives an image (or a list of images) in that column.

Every bad pair is one line naming it (a missing or extra conditioning image, stems that differ, a corrupt file, a
spatial image whose aspect ratio is not its target's) before any model loads; with `data.on_bad_image: skip`
the pair is left out with a warning instead. PIL only, no torch (`--check` scans with this).
"""

from __future__ import annotations

from pathlib import Path

from finetune.data.buckets import reference_bucket
from finetune.data.images import Cover, cover
from finetune.data.records import Conditioning, Problems, Record, confined, image_files
from finetune.errors import DataError

ASPECT_TOLERANCE = 0.01  # a spatial image may differ from its target's aspect ratio by rounding, no more


# ------------------------------------------------------------------------------------------- folder layout
def control_dirs(root: Path, cond) -> list[Path]:
    """The conditioning folders of a folder source, in order: `control/` (count 1) or `control_1/` ... `control_N/`."""
    names = [cond.folder] if cond.count == 1 else [f"{cond.folder}_{i}" for i in range(1, cond.count + 1)]
    if cond.count == 1 and not (root / cond.folder).is_dir() and (root / f"{cond.folder}_1").is_dir():
        names = [f"{cond.folder}_1"]
    for name in names:
        if not (root / name).is_dir():
            have = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name.startswith(cond.folder))
            extra = f" (found {', '.join(have)}: set data.conditioning.count to match)" if have else ""
            raise DataError(f"{root}: no {name}/ folder of conditioning images{extra}; put each target's "
                            f"conditioning image there under the target's file name")
    return [root / n for n in names]


def target_dir(root: Path, cond) -> Path:
    folder = root / cond.target_folder
    if not folder.is_dir():
        raise DataError(f"{root}: no {cond.target_folder}/ folder; with data.conditioning a folder source holds "
                        f"{cond.target_folder}/ (images and captions) beside {cond.folder}/ (conditioning images, "
                        "same file names)")
    return folder


def _by_stem(folder: Path, files: list[Path]) -> dict[str, Path]:
    """{relative path without suffix: file}; two files of one stem (a.png, a.jpg) cannot be told apart."""
    out: dict[str, Path] = {}
    for f in files:
        stem = str(f.relative_to(folder).with_suffix(""))
        if stem in out:
            raise DataError(f"{f}: two images share the stem '{stem}' ({out[stem].name}, {f.name}); pairs are "
                            "matched by file stem, keep one")
        out[stem] = f
    return out


def folder_pairs(root: Path, targets: list[Path], cond, recursive: bool, probs: Problems) -> dict[Path, list[Path]]:
    """{target file: its conditioning files, in folder order} for the targets under `root/<target_folder>`;
    targets without a full set are reported (and, with on_bad_image: skip, left out)."""
    tdir = root / cond.target_folder
    wanted = _by_stem(tdir, targets)
    found: dict[Path, list[Path]] = {t: [] for t in targets}
    for cdir in control_dirs(root, cond):
        have = _by_stem(cdir, image_files(cdir, recursive, within=root))
        missing = [s for s in wanted if s not in have]
        extra = [s for s in have if s not in wanted]
        if missing and extra:
            raise DataError(f"{wanted[missing[0]]}: no conditioning image '{missing[0]}.*' in {cdir.name}/, and "
                            f"{have[extra[0]]} matches no target: pairs are matched by file stem, so rename one of "
                            "them to agree")
        for s in missing:
            probs.bad(str(wanted[s]), f"has no conditioning image in {cdir.name}/ (pairs are matched by file stem)",
                      f"add {cdir.name}/{s}.png (any image type) or remove the target")
        for s in extra:
            probs.bad(str(have[s]), f"matches no target in {cond.target_folder}/ (pairs are matched by file stem)",
                      f"add its target {cond.target_folder}/{s}.* or remove it")
        for s, t in wanted.items():
            if s in have:
                found[t].append(have[s])
    return {t: cs for t, cs in found.items() if len(cs) == cond.count}


# ------------------------------------------------------------------------------------------- columns
def column_values(row: dict, cond, where: str) -> list:
    """The conditioning entries of one metadata / datasets row: `column` (one entry, or a list of them), else
    `column_1` ... `column_N`; the count must be data.conditioning.count."""
    col = cond.column
    if col in row and row[col] not in (None, ""):
        value = row[col]
        values = list(value) if isinstance(value, list | tuple) else [value]
    elif f"{col}_1" in row:
        values = [row.get(f"{col}_{i}") for i in range(1, cond.count + 1)]
        values = [v for v in values if v not in (None, "")]
    else:
        raise DataError(f"{where}: no '{col}' column (or '{col}_1', '{col}_2', ...) of conditioning images "
                        f"(columns: {', '.join(map(str, row))}); set data.conditioning.column or fix the file")
    if len(values) != cond.count:
        raise DataError(f"{where}: {len(values)} conditioning image(s), but data.conditioning.count is "
                        f"{cond.count}; give every row {cond.count} or change the count")
    return values


def hf_condition_columns(ds, cond, name: str) -> list[str]:
    """The datasets columns holding conditioning images: `column`, else `column_1` ... `column_N`."""
    if cond.column in ds.column_names:
        return [cond.column]
    numbered = [f"{cond.column}_{i}" for i in range(1, cond.count + 1)]
    if all(c in ds.column_names for c in numbered):
        return numbered
    raise DataError(f"{name}: no column '{cond.column}' (or '{cond.column}_1' ...) of conditioning images "
                    f"(columns: {', '.join(ds.column_names)}); set data.conditioning.column")


def metadata_controls(row: dict, cond, root: Path, where: str, probs: Problems) -> list[Path] | None:
    """The conditioning files a metadata row names (confined to the dataset folder); None after reporting one
    that does not exist."""
    paths = []
    for name in column_values(row, cond, where):
        path = confined(root, str(name), where)
        if not path.is_file():
            probs.bad(where, f"conditioning image '{name}' does not exist in {root}", "fix the row")
            return None
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------- checks
def check_condition(rec: Record, cond: Conditioning, probs: Problems) -> bool:
    """A spatial image must have its target's aspect ratio (it is resized and cropped exactly as the target)."""
    if cond.role != "spatial":
        return True
    (ht, wt), (hc, wc) = rec.size, cond.size
    if abs(hc / wc - ht / wt) <= ASPECT_TOLERANCE * ht / wt:
        return True
    probs.bad(cond.key, f"is {wc}x{hc} but its target {rec.key} is {wt}x{ht}; a spatial conditioning image must "
              "have its target's aspect ratio", f"resize or crop it to {wt}x{ht} (or use role: reference)")
    return False


def fitting(records: list[Record], probs: Problems) -> list[Record]:
    """The records whose conditioning images fit them; each pair that does not is reported and left out."""
    return [r for r in records if all(check_condition(r, c, probs) for c in r.conditions)]


def with_conditions(rec: Record, conds: list[Conditioning], probs: Problems) -> Record | None:
    """The record carrying its conditioning images, or None (after reporting) when one does not fit it."""
    from dataclasses import replace

    if not all(check_condition(rec, c, probs) for c in conds):
        return None
    return replace(rec, conditions=tuple(conds))


# ------------------------------------------------------------------------------------------- geometry
def cond_name(j: int, flipped: bool) -> str:
    """The name of conditioning image j's latents in a latent-cache entry."""
    return f"cond_{j}_flip" if flipped else f"cond_{j}"


class Pairs:
    """Paired data's geometry (data.conditioning): a spatial image takes its target's resize and crop; a
    reference covers a bucket of the target's aspect ratio at its own pixel budget, centre-cropped.
    `text_reads`: the family's text encoder sees the conditioning images (their text is keyed on them)."""

    def __init__(self, cfg, resolution: int, text_reads: bool = False):
        self.cfg, self.resolution, self.text_reads = cfg, resolution, text_reads

    def geometry(self, cond, target: Cover, bucket) -> tuple[tuple[int, int], Cover, tuple[int, int]]:
        """(size it is resized to (h, w), the crop, the crop's (h, w)) of a conditioning image."""
        if cond.role == "spatial":
            return (target.rh, target.rw), target, tuple(bucket)
        own = reference_bucket(bucket, self.resolution, self.cfg.resolution or self.resolution)
        c = cover(cond.size, own, "center")
        return (c.rh, c.rw), c, own
