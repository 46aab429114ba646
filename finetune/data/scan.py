"""Scan a recipe's `data:` section: every source and the prior-preservation class images, checked and
bucketed, plus the human summary `--check` prints. No torch here.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from finetune.data.buckets import assign, buckets_for, describe
from finetune.data.captions import apply_rules, rng_for
from finetune.data.config import CaptionRules, DataSection, PriorSection
from finetune.data.records import Problems, Record, Subset, image_files, load_images
from finetune.data.sources import SCANNERS
from finetune.data.stats import caption_stats
from finetune.errors import DataError


@dataclass
class Scan:
    data: DataSection
    subsets: list[Subset]  # the training subsets, in recipe order
    prior: Subset | None  # class images of prior preservation
    buckets: list[tuple[int, int]]  # all allowed buckets
    problems: Problems
    assigned: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # subset index -> bucket per record

    @property
    def num_images(self) -> int:
        return sum(len(s.records) for s in self.subsets)

    @property
    def num_examples(self) -> int:
        return sum(len(s.records) * s.repeats for s in self.subsets)

    def bucket_counts(self) -> Counter:
        return Counter(b for i in range(len(self.subsets)) for b in self.assigned[i])

    def fingerprint(self) -> str:
        """Changes whenever an image's bytes, a caption before rules, a repeat count or a subset change."""
        h = hashlib.blake2b(digest_size=16)
        for s in self.subsets + ([self.prior] if self.prior else []):
            h.update(json.dumps([s.name, s.kind, s.repeats, s.is_prior] + ([True] if s.preserve else [])).encode())
            for r in s.records:
                conds = [[c.key, c.digest, c.role] for c in r.conditions]  # paired data: every input counts
                clip = [list(r.clip)] if r.clip is not None else []  # which frames: the sampling settings
                h.update(json.dumps([r.key, r.digest, r.caption, r.size, *clip] + ([conds] if conds else [])).encode())
        return h.hexdigest()


# ---------------------------------------------------------------------------------------------- class images
def class_image_files(prior: PriorSection) -> list[Path]:
    """Class images already in `prior.class_dir` (sorted; the first num_class_images are used)."""
    root = Path(prior.class_dir).expanduser()
    return image_files(root) if root.is_dir() else []


def count_class_images(prior: PriorSection) -> int:
    """How many usable-looking class images exist (capped at num_class_images); the rest must be generated."""
    return min(len(class_image_files(prior)), prior.num_class_images)


def scan_prior(prior: PriorSection, probs: Problems) -> Subset:
    files = class_image_files(prior)[: prior.num_class_images]
    if not files:
        raise DataError(
            f"{prior.class_dir}: no class images for prior preservation; generate them first "
            f"({prior.num_class_images} wanted) or remove data.prior"
        )
    sub = Subset(prior.class_dir, "prior", 1, CaptionRules(), is_prior=True)
    sub.records = load_images([(f, prior.class_prompt) for f in files], probs)
    if len(files) < prior.num_class_images:
        sub.notes.append(f"only {len(files)} of {prior.num_class_images} class images exist; the rest are generated")
    return sub


# ------------------------------------------------------------------------------------------------- scan
def scan_data(data: DataSection, verbose: bool = True, need_prior: bool = True) -> Scan:
    """Scan every source. Fatal problems raise DataError; skipped files are warned about and counted.
    need_prior=False lets `--check` report missing class images instead of failing on them."""
    lo, _ = data.buckets.sides(data.resolution)
    probs = Problems(data.on_bad_image, min_side=min(lo, data.resolution), verbose=verbose)
    subsets = []
    for i, src in enumerate(data.sources):
        for sub in SCANNERS[src.type](src, data, probs, f"data.sources.{i}"):
            if not sub.records:
                raise DataError(
                    f"{sub.name}: subset has no usable images ({len(probs.skipped)} file(s) skipped so far); "
                    "fix or add images, or remove the source"
                )
            _check_counts(sub, data)
            sub.preserve = src.preserve
            subsets.append(sub)
    prior = None
    if data.prior is not None and (need_prior or count_class_images(data.prior)):
        prior = scan_prior(data.prior, probs)
    scan = Scan(data, subsets, prior, buckets_for(data), probs)
    for i, sub in enumerate(subsets):
        scan.assigned[i] = assign([r.size for r in sub.records], scan.buckets)
        if data.video is not None:  # spatio-temporal buckets: (h, w, frames); an image is a one-frame clip
            scan.assigned[i] = [(*b, r.frames) for b, r in zip(scan.assigned[i], sub.records, strict=True)]
    return scan


def _check_counts(sub: Subset, data: DataSection) -> None:
    """Paired data: every record carries data.conditioning.count images (a source that draws no pairs, or pairs
    in a recipe without data.conditioning, is a mistake worth one line)."""
    want = data.conditioning.count if data.conditioning else 0
    for rec in sub.records:
        if len(rec.conditions) != want:
            fix = ("set data.conditioning (and its count)" if not want else
                   "give every record its conditioning images (a folder with target/ and control/, a metadata column)")
            raise DataError(f"{rec.key}: has {len(rec.conditions)} conditioning image(s), the recipe wants {want}; {fix}")


# ---------------------------------------------------------------------------------------------- summary
def sample_captions(scan: Scan, seed: int, per_subset: int = 2) -> list[tuple[Record, str]]:
    out = []
    for i, sub in enumerate(scan.subsets):
        for j, rec in enumerate(sub.records[:per_subset]):
            out.append((rec, apply_rules(rec.caption, sub.rules, rng_for(seed, 0, i, j))))
    return out


def summarize(scan: Scan, seed: int = 0, extra: list[str] | None = None) -> str:
    d = scan.data
    lines = [f"data: {len(scan.subsets)} subset(s), {scan.num_images} images, {scan.num_examples} examples per epoch"]
    for sub in scan.subsets:
        role = " (preservation: toward the base's prediction)" if sub.preserve else ""
        lines.append(f"  {sub.kind:8s} {sub.name}: {len(sub.records)} images x {sub.repeats} repeats{role}")
    if d.prior is not None:
        have = len(scan.prior.records) if scan.prior else 0
        lines.append(
            f"  prior    {d.prior.class_dir}: {have} of {d.prior.num_class_images} class images "
            f"({d.prior.class_prompt!r}, loss weight {d.prior.loss_weight})"
        )
    if d.conditioning is not None:
        c = d.conditioning
        how = ("resized, cropped and flipped with their target" if c.role == "spatial" else
               f"resized on their own to {c.resolution or d.resolution} px area, centre crop, never flipped")
        lines.append(f"conditioning: {c.count} {c.role} image(s) per record, {how}")
    mode = "aspect buckets" if d.buckets.enabled else "square, bucketing off"
    lines.append(f"buckets ({mode}, {d.crop} crop, WxH: images): {describe(scan.bucket_counts())}")
    lines.append("captions after the rules (samples):")
    lines += [f"  {rec.key}: {cap!r}" for rec, cap in sample_captions(scan, seed)]
    stats = caption_stats(scan.subsets, d.caption.separator)
    lines += stats.lines() + (extra or [])
    notes = [f"{sub.name}: {n}" for sub in scan.subsets + ([scan.prior] if scan.prior else []) for n in sub.notes]
    notes += stats.duplicate_notes()
    skipped = scan.problems.skipped
    if skipped:
        notes.append(f"{len(skipped)} file(s) skipped (on_bad_image: skip): " + "; ".join(skipped[:5])
                     + (" ..." if len(skipped) > 5 else ""))
    lines.append("problems: none" if not notes else "problems:")
    lines += [f"  - {n}" for n in notes]
    return "\n".join(lines)
