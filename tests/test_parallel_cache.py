"""Latent and text caches filled by several processes together: each encodes its share, all read all, and the
files are byte for byte those one process writes; a failure mid-cache leaves only whole entries."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.data.cache import Cache, fill
from tests.helpers import DDP_CPU, draw_images, launch, run_trainer, write_recipe


def cache_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.safetensors"))}


@pytest.mark.slow
def test_two_processes_share_the_cache_work_and_write_the_same_bytes(tmp_path, tiny_base):
    # 8 images in 4 encoder batches of 2 and 4 captions in 2 batches: each process encodes half of each
    images = draw_images(tmp_path / "images", n=8)
    for i in range(8):
        (images / f"{i}.txt").write_text(f"a sks circle, number {i % 4}")
    recipe = write_recipe(tmp_path, tiny_base, images, data={"cache_latents": True, "cache_text": True},
                          train={"max_steps": 1})
    # progress on: the main process prints the data summary with what it encoded itself
    two = launch(recipe, DDP_CPU, f"train.output_dir={tmp_path / 'two'}", "logging.progress=true", timeout=420)
    assert two.returncode == 0, two.stderr[-3000:]
    log = two.stdout + two.stderr
    # the main process reports its own share
    assert "latent cache: 8 entries, 4 encoded now" in log and "text cache: 4 captions, 2 encoded now" in log
    run_trainer(recipe, f"train.output_dir={tmp_path / 'one'}")
    for kind, count in (("latents", 8), ("text", 4)):
        one, two_files = cache_files(tmp_path / "one" / "cache" / kind), cache_files(tmp_path / "two" / "cache" / kind)
        assert len(one) == count and one == two_files  # same names, same bytes


def test_shares_split_the_batches_one_process_would_encode(tmp_path):
    """The batches are cut as one process cuts them, then dealt out: together the shares are the whole."""
    jobs = [(f"k{i}", i % 2, i) for i in range(7)]  # two shape groups: 4 and 3 entries
    seen: dict[int, list[list[int]]] = {}

    def encoder(rank):
        def run(payloads):
            seen.setdefault(rank, []).append(list(payloads))
            return [{"x": torch.full((2,), float(p))} for p in payloads]
        return run

    one = Cache(tmp_path / "one")
    fill(one, jobs, 2, encoder(-1), "", False)
    shared = Cache(tmp_path / "shared")
    counts = [fill(shared, jobs, 2, encoder(r), "", False, share=(r, 2)) for r in (0, 1)]
    assert counts == [4, 3]
    assert sorted(seen[0] + seen[1]) == sorted(seen[-1])  # the very batches one process encodes
    assert seen[0] == [[0, 2], [1, 3]] and seen[1] == [[4, 6], [5]]
    assert cache_files(tmp_path / "one") == cache_files(tmp_path / "shared")
    assert fill(shared, jobs, 2, encoder(9), "", False) == 0  # nothing left for anybody


def test_a_failure_mid_cache_leaves_only_whole_entries(tmp_path, monkeypatch):
    """The third entry's write dies half-way (a full disk, a killed process): the two before it are whole,
    and no torn file is left where a later run would read it."""
    from finetune.data import cache as cache_module

    real, calls = cache_module.save_file, []

    def dying(tensors, path):
        calls.append(path)
        if len(calls) == 3:
            Path(path).write_bytes(b"half an entry")
            raise OSError(28, "No space left on device")
        real(tensors, path)

    monkeypatch.setattr(cache_module, "save_file", dying)
    cache = Cache(tmp_path)
    with pytest.raises(OSError):
        fill(cache, [(f"key{i}", 0, i) for i in range(6)], 2, lambda ps: [{"x": torch.ones(3) * p} for p in ps],
             "", False)
    entries = [p for p in sorted(tmp_path.rglob("*")) if p.is_file()]
    assert len(entries) == 2 and all(p.suffix == ".safetensors" and not p.name.startswith(".") for p in entries)
    assert all(load_file(p)["x"].shape == (3,) for p in entries)
    assert [k for k in (f"key{i}" for i in range(6)) if cache.has(k)] == ["key0", "key1"]
