"""Latent and text-embedding caches: computed once, kept as one safetensors file per entry.

A key hashes everything that changes an entry: for latents the image bytes, bucket, resize and crop,
and the encoder identity (VAE hash + dtype, given by the trainer); for text the caption and the text
encoder identity. A changed input therefore misses the cache and is re-encoded; nothing is ever
invalidated in place. Files are written to a temp name and renamed, so a killed run leaves no torn entry.

Several processes fill one cache together: the missing entries are cut into the encoder batches one process
would use, and process r encodes batches r, r + N, r + 2N, ... and writes them; after a barrier every process
reads every entry. The batches are the same however many processes share them, so the files are byte for byte
those one process writes.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

VERSION = "1"  # bump when the layout of an entry changes
MEMO_BYTES = 1 << 30  # entries read from disk kept in memory per process (persistent loader workers keep theirs)


def entry_key(*parts: object) -> str:
    return hashlib.blake2b(json.dumps([VERSION, *parts]).encode(), digest_size=20).hexdigest()


class Cache:
    """Entries on disk under `root` (None: in memory only). `write=False` keeps what it computes in memory
    instead of writing (a process that must not touch the disk)."""

    def __init__(self, root: Path | None, write: bool = True, memo_bytes: int | None = None):
        self.root, self.write = root, write
        self.memory: dict[str, dict[str, torch.Tensor]] = {}
        # budget left for entries read from disk: a set that fits is read from disk once per process
        self.memo_bytes = MEMO_BYTES if memo_bytes is None else memo_bytes

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return key in self.memory or (self.root is not None and self._path(key).is_file())

    def usable(self, key: str) -> bool:
        """Present and whole: a truncated or garbled file (a full disk, a copy cut short) reads as absent and
        is re-encoded, with a warning naming it, instead of crashing the run at its first batch."""
        if key in self.memory:
            return True
        if self.root is None or not self._path(key).is_file():
            return False
        try:
            with safe_open(str(self._path(key)), framework="pt") as f:
                for name in f.keys():
                    f.get_slice(name)
            return True
        except Exception:  # noqa: BLE001 - safetensors raises its own error type on a damaged file
            warnings.warn(f"cache entry {self._path(key)} is damaged; encoding it again", stacklevel=2)
            return False

    def get(self, key: str) -> dict[str, torch.Tensor]:
        if key in self.memory:
            return self.memory[key]
        try:
            entry = load_file(self._path(key))
        except Exception as e:  # noqa: BLE001 - damaged after the run checked it
            from finetune.errors import DataError

            raise DataError(f"{self._path(key)}: cache entry unreadable ({str(e).splitlines()[0][:120]}); "
                            "delete it and run again (it is encoded anew)") from None
        size = sum(t.nbytes for t in entry.values())
        if size <= self.memo_bytes:  # callers copy out of entries (stack, float), never write into them
            self.memory[key] = entry
            self.memo_bytes -= size
        return entry

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        if self.root is None or not self.write:
            self.memory[key] = tensors
            return
        path = self._path(key)
        from finetune.export.io import atomic_path

        # no fsync per entry (hundreds of them before the first step): `usable` finds an entry a crash damaged
        with atomic_path(path, durable=False) as tmp:
            save_file(tensors, str(tmp))


def fill(cache: Cache, jobs: list, batch: int, encode, desc: str, progress: bool,
         share: tuple[int, int] = (0, 1)) -> int:
    """Encode the jobs whose key is missing, `batch` at a time. A job is (key, group, payload); only jobs
    of the same group (same tensor shape) share a call. `encode(payloads) -> list of entry dicts`.
    `share=(rank, processes)`: this process encodes only every processes-th batch, from the rank-th. The
    batches are cut from all the jobs, not from the missing ones: which entries exist changes while the other
    processes write, and every process must deal out the same batches.
    Returns how many entries this process encoded."""
    groups: dict[object, list] = {}
    seen = set()
    for key, group, payload in jobs:
        if key not in seen:
            seen.add(key)
            groups.setdefault(group, []).append((key, payload))
    chunks = [group[i : i + batch] for group in groups.values() for i in range(0, len(group), batch)]
    rank, processes = share
    mine = [[job for job in chunk if not cache.usable(job[0])] for chunk in chunks[rank::processes]]
    mine = [chunk for chunk in mine if chunk]
    total = sum(len(c) for c in mine)
    if not total:
        return 0
    with tqdm(total=total, desc=desc, unit="item", disable=not progress) as bar:
        for chunk in mine:
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
