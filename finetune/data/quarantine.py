"""Move offending images (and their captions) out of a dataset: never deleted, never overwriting anything.

    photos/img_0042.jpg  ->  photos-quarantine/duplicate/img_0042.jpg   (+ img_0042.txt)

Each image goes under the folder of its first problem; a name already taken there gets -1, -2, ... Every
move is appended to quarantine.log (kind, from, to, why) as it happens, so an interrupted run is recorded
up to its last move. Moving a file back restores it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from finetune.data.hygiene import FIXABLE, HygieneReport

SIDECARS = (".txt", ".caption", ".cap", ".tags", ".json")


@dataclass(frozen=True)
class Move:
    kind: str
    src: str
    dst: str


def default_quarantine(folder: str | Path) -> Path:
    """Next to the dataset, not inside it, so a recursive scan never picks the offenders up again."""
    folder = Path(folder)
    return folder.parent / f"{folder.name}-quarantine"


def _free_name(target: Path) -> Path:
    n = 0
    candidate = target
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = target.with_name(f"{target.stem}-{n}{target.suffix}")
    return candidate


def _move(src: Path, target: Path) -> Path:
    """move_no_clobber into the first free name; a name taken between the check and the move is skipped."""
    from finetune.export.io import move_no_clobber

    while True:
        try:
            return move_no_clobber(src, _free_name(target))
        except FileExistsError:
            continue


def quarantine(report: HygieneReport, dest: str | Path | None = None, kinds=FIXABLE) -> list[Move]:
    """Move every image with a problem among `kinds` and its sidecar captions to dest/<kind>/."""
    root = Path(report.folder)
    dest = Path(dest) if dest is not None else default_quarantine(root)
    exts = dict.fromkeys((report.options.caption_ext, *SIDECARS))
    moves: list[Move] = []
    offenders = report.offenders(kinds)
    if not offenders:
        return moves
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / "quarantine.log", "a", encoding="utf-8") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} from {root}\n")
        for path, finding in offenders.items():
            img = Path(path)
            rel = img.relative_to(root)
            new_img = _move(img, dest / finding.kind / rel)  # the image first: a crash never strands it captionless
            group = [(img, new_img)]
            for ext in exts:
                side = img.with_suffix(ext)
                if side.is_file():
                    group.append((side, _move(side, new_img.with_suffix(ext))))
            for src, dst in group:
                moves.append(Move(finding.kind, str(src), str(dst)))
                log.write(f"{finding.kind}\t{src}\t{dst}\t{finding.detail}\n")
            log.flush()
    return moves
