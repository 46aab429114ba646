"""Every file path the browser sends goes through here: relative to `--root`, inside it after symlinks.

A path from the browser is a string relative to the studio's root. Absolute paths, `~`, drive letters and
`..` components are refused outright; what is left is joined to the root and resolved (symlinks followed,
missing tail components allowed), and refused unless it still lies inside the resolved root. So a symlink
inside the root that points out of it is refused too, for reading and for writing.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from finetune.errors import UserError


class PathError(UserError):
    """A browser-sent path that is not confined to the studio root (HTTP 403)."""


def confine(root: Path, rel: str, what: str = "path") -> Path:
    """root/rel, resolved, or PathError. `root` must already be resolved."""
    if not isinstance(rel, str):
        raise PathError(f"{what}: expected a path relative to the studio root, got {type(rel).__name__}")
    text = rel.strip()
    if "\x00" in text:
        raise PathError(f"{what}: path holds a NUL byte")
    if text.startswith("~") or PurePosixPath(text).is_absolute() or PureWindowsPath(text).drive \
            or PureWindowsPath(text).is_absolute():
        raise PathError(f"{what}: '{rel}' is absolute; give a path relative to the studio root")
    parts = PurePosixPath(text.replace("\\", "/")).parts
    if ".." in parts:
        raise PathError(f"{what}: '{rel}' climbs out with '..'; give a path inside the studio root")
    target = Path(os.path.realpath(root.joinpath(*parts)))
    if target != root and not target.is_relative_to(root):
        raise PathError(f"{what}: '{rel}' leads outside the studio root (through a symlink)")
    return target


def relative(root: Path, path: Path) -> str:
    """The browser's name for a path inside the root ('' for the root itself), with '/' separators."""
    rel = Path(os.path.realpath(path)).relative_to(root)
    return "" if str(rel) == "." else rel.as_posix()


def inside(root: Path, path: Path) -> bool:
    """True when `path` (symlinks followed) lies inside the root."""
    real = Path(os.path.realpath(path))
    return real == root or real.is_relative_to(root)


def links_out(root: Path, folder: Path, limit: int = 5) -> list[str]:
    """Entries under `folder` (any depth) that lead outside the root through a symlink: a scan or a run
    would read them, so the studio refuses such a folder instead (first `limit` names, relative to root)."""
    found = []
    for dirpath, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(dirpath) / name
            if p.is_symlink() and not inside(root, p):
                found.append(p.relative_to(root).as_posix())
                if len(found) >= limit:
                    return found
    return found
