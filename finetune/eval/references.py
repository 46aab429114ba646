"""The reference images the subject metrics (clip_i, dino) compare grids with: `validation.reference_dir`, or the
first data source's images. Found and checked with the training scan's own rules (`data.on_bad_image`), so
`--check` reads exactly what the run will (PIL only, no torch).
"""

from __future__ import annotations

from finetune.data.images import BadImage, decode
from finetune.data.records import Problems, Record, image_files, load_images, need_dir
from finetune.errors import DataError

MAX_REFERENCES = 64  # more reference images add little to a mean and cost an embedding pass each


def _spread(items: list) -> list:
    if len(items) <= MAX_REFERENCES:
        return items
    return [items[i * len(items) // MAX_REFERENCES] for i in range(MAX_REFERENCES)]


def folder_records(folder, key: str, on_bad: str = "error", verbose: bool = True) -> tuple[list[Record], Problems]:
    """A reference folder's images, each read and checked; a bad one stops (naming it) or, with on_bad 'skip',
    is left out and listed in the returned Problems. Any size will do: the metric models resize."""
    hint = "pass --on-bad-image skip" if key.startswith("--") else "set data.on_bad_image: skip"
    probs = Problems(on_bad, min_side=1, verbose=verbose, skip_hint=hint)
    files = image_files(need_dir(str(folder), key))
    records = load_images([(f, "") for f in files], probs)
    if not records:
        skipped = f" ({len(probs.skipped)} unusable)" if probs.skipped else ""
        raise DataError(f"{folder}: no usable images{skipped} ({key}); add .png/.jpg/.webp images of the subject")
    return records, probs


def reference_records(recipe, verbose: bool = False) -> tuple[list[Record], Problems, str]:
    """(records, what was skipped, where they come from) for the run's subject metrics."""
    from finetune.data.sources import SCANNERS

    v, d = recipe.validation, recipe.data
    if v.reference_dir:
        records, probs = folder_records(v.reference_dir, "validation.reference_dir", d.on_bad_image, verbose)
        return records, probs, str(v.reference_dir)
    lo, _ = d.buckets.sides(d.resolution)  # the training scan's rules: what it skips is skipped here too
    probs = Problems(d.on_bad_image, min_side=min(lo, d.resolution), verbose=verbose)
    src = d.sources[0]
    records = [r for sub in SCANNERS[src.type](src, d, probs, "data.sources.0") for r in sub.records]
    return records, probs, "data.sources.0"


def decode_all(records: list[Record]) -> list:
    """Upright RGB images of (at most MAX_REFERENCES, evenly spread) records; a file that passed the check and
    still fails to decode in full is named."""
    out = []
    for r in _spread(records):
        try:
            out.append(decode(r.read()))
        except (BadImage, OSError) as e:
            raise DataError(f"{r.key}: reference image {e}; replace or remove the file") from None
    return out


def reference_dir_images(folder, key: str, on_bad: str = "error") -> list:
    """The images of a reference folder (at most MAX_REFERENCES, evenly spread), upright RGB."""
    return decode_all(folder_records(folder, key, on_bad)[0])


def reference_images(recipe) -> list:
    """validation.reference_dir's images, else the first data source's (the instance images)."""
    return decode_all(reference_records(recipe)[0])


def reference_summary(recipe) -> list[str]:
    """`--check`'s lines about the metric references (none when the recipe scores no grid)."""
    if not recipe.validation.metrics:
        return []
    records, probs, where = reference_records(recipe)
    used = min(len(records), MAX_REFERENCES)
    lines = [f"metric references ({', '.join(recipe.validation.metrics)}): {used} of {len(records)} images from "
             f"{where}"]
    if probs.skipped and recipe.validation.reference_dir:  # the first source's skips are listed with the scan's
        lines.append(f"  {len(probs.skipped)} reference file(s) skipped (on_bad_image: skip): "
                     + "; ".join(probs.skipped[:3]))
    return lines
