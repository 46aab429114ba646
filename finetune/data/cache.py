"""Latent and text-embedding caches: computed once, kept as one safetensors file per entry.

A key hashes everything that changes an entry: for latents the image bytes, bucket, resize and crop,
and the encoder identity (VAE hash + dtype, given by the trainer); for text the caption and the text
encoder identity. A changed input therefore misses the cache and is re-encoded; nothing is ever
invalidated in place. Files are written to a temp name and renamed, so a killed run leaves no torn entry.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

VERSION = "1"  # bump when the layout of an entry changes


def entry_key(*parts: object) -> str:
    return hashlib.blake2b(json.dumps([VERSION, *parts]).encode(), digest_size=20).hexdigest()


class Cache:
    """Entries on disk under `root` (None: in memory only). `write=False` (non-main ranks) keeps what it
    computes in memory instead of writing, so only the main process writes to disk."""

    def __init__(self, root: Path | None, write: bool = True):
        self.root, self.write = root, write
        self.memory: dict[str, dict[str, torch.Tensor]] = {}

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return key in self.memory or (self.root is not None and self._path(key).is_file())

    def get(self, key: str) -> dict[str, torch.Tensor]:
        if key in self.memory:
            return self.memory[key]
        return load_file(self._path(key))

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        if self.root is None or not self.write:
            self.memory[key] = tensors
            return
        path = self._path(key)
        from finetune.export.io import atomic_path

        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))


def fill(cache: Cache, jobs: list, batch: int, encode, desc: str, progress: bool) -> int:
    """Encode the jobs whose key is missing, `batch` at a time. A job is (key, group, payload); only jobs
    of the same group (same tensor shape) share a call. `encode(payloads) -> list of entry dicts`.
    Returns how many entries were encoded."""
    missing: dict[object, list] = {}
    seen = set()
    for key, group, payload in jobs:
        if key not in seen and not cache.has(key):
            seen.add(key)
            missing.setdefault(group, []).append((key, payload))
    total = sum(len(v) for v in missing.values())
    if not total:
        return 0
    with tqdm(total=total, desc=desc, unit="item", disable=not progress) as bar:
        for group in missing.values():
            for i in range(0, len(group), batch):
                chunk = group[i : i + batch]
                with torch.no_grad():
                    entries = encode([p for _, p in chunk])
                for (key, _), entry in zip(chunk, entries, strict=True):
                    cache.put(key, entry)
                bar.update(len(chunk))
    return total


def split_batch(out: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """{name: [n, ...]} -> n entries of {name: [...]}."""
    for name, t in out.items():
        if not isinstance(t, torch.Tensor) or t.shape[0] != n:
            raise ValueError(f"text encoder output '{name}' must be a tensor with batch dimension {n}")
    return [{name: t[i] for name, t in out.items()} for i in range(n)]
