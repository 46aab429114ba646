"""The one resolver: every path from a request or from a recipe submitted through the studio goes through here.

A path from the browser is a string relative to the studio's root. Absolute paths, `~`, drive letters and
`..` components are refused outright, and so are NUL bytes and names no filesystem takes (too long); what is
left is joined to the root and resolved (symlinks followed, missing tail components allowed), and refused
unless it still lies inside the resolved root. So a symlink inside the root that points out of it is refused
too, for reading and for writing. The studio's own folder `<root>/.studio` (run records, the recipes runs
launch, job logs) is refused as well: no request reads or writes it, so nothing a request sends can replace
what a run will execute.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from finetune.errors import UserError

STUDIO_DIR = ".studio"  # the studio's own files under the root: never reachable through a request path
MAX_PATH_CHARS = 1024  # far above any real dataset path, far below what makes the OS (or a log line) choke
MAX_NAME_BYTES = 255  # one path component, as every common filesystem limits it


class PathError(UserError):
    """A browser-sent path that is not confined to the studio root (HTTP 403)."""


def _shown(rel: str) -> str:
    """The path as a message may quote it: one line, at most 80 characters."""
    text = rel.replace("\n", " ").replace("\r", " ").replace("\x00", "\\0")
    return text if len(text) <= 80 else text[:77] + "..."


def relative_parts(rel: object, what: str = "path") -> tuple[str, ...]:
    """The components of a relative path, or PathError for anything that is not one (the syntactic half of
    `confine`, for paths resolved later against a folder the studio does not know yet)."""
    if not isinstance(rel, str):
        raise PathError(f"{what}: expected a path relative to the studio root, got {type(rel).__name__}")
    text = rel.strip()
    if "\x00" in text:
        raise PathError(f"{what}: path holds a NUL byte")
    if len(text) > MAX_PATH_CHARS:
        raise PathError(f"{what}: path of {len(text)} characters is too long (at most {MAX_PATH_CHARS})")
    if text.startswith("~") or PurePosixPath(text).is_absolute() or PureWindowsPath(text).drive \
            or PureWindowsPath(text).is_absolute():
        raise PathError(f"{what}: '{_shown(rel)}' is absolute; give a path relative to the studio root")
    parts = tuple(p for p in PurePosixPath(text.replace("\\", "/")).parts if p != ".")
    if ".." in parts:
        raise PathError(f"{what}: '{_shown(rel)}' climbs out with '..'; give a path inside the studio root")
    if any(len(p.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES for p in parts):
        raise PathError(f"{what}: '{_shown(rel)}' has a name longer than {MAX_NAME_BYTES} bytes")
    return parts


def confine(root: Path, rel: object, what: str = "path") -> Path:
    """root/rel, resolved, or PathError. `root` must already be resolved; it may also be a folder inside the
    studio root (a run's output folder), which then confines the path in the same way."""
    parts = relative_parts(rel, what)
    target = Path(os.path.realpath(root.joinpath(*parts)))
    if target != root and not target.is_relative_to(root):
        raise PathError(f"{what}: '{_shown(rel)}' leads outside the studio root (through a symlink)")
    private = root / STUDIO_DIR
    if target == private or target.is_relative_to(private):
        raise PathError(f"{what}: '{_shown(rel)}' is inside the studio's own folder {STUDIO_DIR}/, which "
                        "requests cannot reach; choose a folder of your data")
    return target


def relative(root: Path, path: Path) -> str:
    """The browser's name for a path inside the root ('' for the root itself), with '/' separators."""
    rel = Path(os.path.realpath(path)).relative_to(root)
    return "" if str(rel) == "." else rel.as_posix()


def short(root: Path, text: str) -> str:
    """A message with the root's absolute path taken out: the browser knows paths relative to the root."""
    return text.replace(str(root) + os.sep, "").replace(str(root), ".")


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


def refuse_links_out(root: Path, folder: Path, what: str, reader: str) -> None:
    """The dataset rule scans, runs and captioning share: a folder holding links out of the root is refused
    (the reader would follow them), with the first offending names."""
    escaping = links_out(root, folder) if folder.is_dir() else []
    if escaping:
        raise PathError(f"{what}: {', '.join(escaping)} lead(s) outside the studio root; {reader} would read "
                        "them: copy the files in, or remove the links")
