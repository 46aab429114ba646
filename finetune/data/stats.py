"""Caption statistics and identical images of a scan: what `--check` prints and the studio's data page shows.

Computed from the records the scan already holds (captions before the rules, content digests), so nothing
is read twice. No torch here.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field


@dataclass
class CaptionStats:
    images: int = 0
    empty: int = 0  # no caption file, or an empty one
    words_min: int = 0
    words_median: float = 0.0
    words_max: int = 0
    top_tags: list[tuple[str, int]] = field(default_factory=list)  # most frequent comma-separated tags
    duplicates: list[list[str]] = field(default_factory=list)  # groups of byte-identical images

    def lines(self) -> list[str]:
        if not self.images:
            return []
        tags = ", ".join(f"{t!r} x{n}" for t, n in self.top_tags[:5]) or "none"
        out = [f"caption statistics: {self.images - self.empty} of {self.images} images captioned; words per caption "
               f"min {self.words_min}, median {self.words_median:g}, max {self.words_max}; most common tags: {tags}"]
        return out

    def duplicate_notes(self) -> list[str]:
        return [f"{len(g)} identical images (same bytes): " + ", ".join(g[:4]) + (" ..." if len(g) > 4 else "")
                for g in self.duplicates]


def caption_stats(subsets, separator: str = ",", top: int = 10) -> CaptionStats:
    """Statistics over every record of the given subsets (captions as written, before the rules)."""
    records = [r for s in subsets for r in s.records]
    if not records:
        return CaptionStats()
    words = [len(r.caption.split()) for r in records]
    tags = Counter(t.strip() for r in records for t in r.caption.split(separator) if t.strip())
    groups: dict[str, list[str]] = defaultdict(list)
    for r in records:
        groups[r.digest].append(r.key)
    return CaptionStats(
        images=len(records),
        empty=sum(1 for r in records if not r.caption.strip()),
        words_min=min(words),
        words_median=statistics.median(words),
        words_max=max(words),
        top_tags=[(t, n) for t, n in tags.most_common(top) if n > 1],
        duplicates=[g for g in groups.values() if len(g) > 1],
    )
