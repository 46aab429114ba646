"""Shared set-up of the studio tests: a root with data, a sealed folder beside it, an in-process client."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

W = {"X-Studio": "1"}  # what the page sends with every write


def png(path: Path, colour=(200, 30, 30), size: int = 64) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path


def snapshot(folder: Path) -> dict[str, tuple[int, float]]:
    """Every entry under a folder with its size and mtime: 'nothing outside the root changed' is equality."""
    out = {}
    for dirpath, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture()
def world(tmp_path):
    """root/ with data/ (3 captioned images and links out of the root), outside/ with a secret beside it."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    for i, c in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        png(root / "data" / f"{i}.png", c)
        (root / "data" / f"{i}.txt").write_text(f"caption {i}\n")
    png(outside / "secret.png", (1, 2, 3))
    (outside / "secret.txt").write_text("secret caption\n")
    (root / "data" / "link.png").symlink_to(outside / "secret.png")
    (root / "data" / "link.txt").symlink_to(outside / "secret.txt")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    return root, outside


def client(root: Path, **kw):
    from starlette.testclient import TestClient

    from finetune.studio.app import Studio, create_app

    studio = Studio.make(root, **({"hold": True} | kw))
    return TestClient(create_app(studio), base_url="http://127.0.0.1:8765"), studio
