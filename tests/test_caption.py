"""tools/caption.py and finetune.caption on tiny captioning models built offline (random weights: the words are
noise, the plumbing is real): one caption per image, skipping, overwrite, prefix/trigger, dry run, batching,
models we refuse, and an interrupted run that resumes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import ROOT

TOOL = ROOT / "tools" / "caption.py"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two torch threads on this shared 2-core machine spin against each other (20x slower generation)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def florence(tmp_path_factory) -> Path:
    from finetune.caption.build import build_tiny_florence

    return build_tiny_florence(tmp_path_factory.mktemp("cap") / "florence")


@pytest.fixture(scope="module")
def chat(tmp_path_factory) -> Path:
    from finetune.caption.build import build_tiny_chat

    return build_tiny_chat(tmp_path_factory.mktemp("cap") / "chat")


def noise_images(folder: Path, n: int, size: int = 40, seed: int = 0) -> list[Path]:
    """Distinct images (coloured noise, a few sizes) so a random model gives them different captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        tint = rng.random(3)
        arr = (rng.random((size + i % 3 * 8, size, 3)) * tint * 255).astype(np.uint8)
        out.append(folder / f"img{i:03d}.png")
        Image.fromarray(arr).save(out[-1])
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture()
def photos(tmp_path) -> Path:
    """6 images: one with a hand-written caption, one with an empty caption file; plus a broken image and a note."""
    folder = tmp_path / "photos"
    imgs = noise_images(folder, 6)
    imgs[1].with_suffix(".txt").write_bytes(b"my own words\r\n")
    imgs[2].with_suffix(".txt").write_bytes(b"")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.md").write_text("not an image")
    return folder


def run_caption(folder, model, **kw):
    from finetune.caption import CaptionOptions, caption_folder

    return caption_folder(folder, CaptionOptions(model=str(model), **kw), progress=False, echo=None)


def test_one_caption_per_image_existing_files_untouched_then_overwrite(photos, florence):
    before = snapshot(photos)
    res = run_caption(photos, florence, batch_size=2)
    after = snapshot(photos)
    for name, data in before.items():  # every pre-existing file byte-identical (the empty caption included)
        assert after[name] == data, name
    new = sorted(set(after) - set(before))
    assert new == ["img000.txt", "img003.txt", "img004.txt", "img005.txt"]
    assert all(after[n].decode().strip() and after[n].endswith(b"\n") and after[n].count(b"\n") == 1 for n in new)
    assert sorted(Path(p).name for p in res.skipped) == ["img001.png", "img002.png"]
    assert [Path(u.split(":")[0]).name for u in res.unreadable] == ["broken.jpg"]
    assert not list(photos.glob(".*")), "temporary files left behind"

    again = run_caption(photos, florence, batch_size=2)  # nothing left to do: nothing changes
    assert again.captioned == 0 and len(again.skipped) == 6 and len(again.unreadable) == 1
    assert snapshot(photos) == after

    filled = run_caption(photos, florence, fill_empty=True)  # the empty caption file is filled, the rest kept
    assert [Path(p).name for p, _ in filled.written] == ["img002.txt"]
    assert (photos / "img001.txt").read_bytes() == b"my own words\r\n"

    over = run_caption(photos, florence, overwrite=True, batch_size=4)
    assert len(over.written) == 6
    assert (photos / "img001.txt").read_text().strip() != "my own words"
    assert (photos / "img000.txt").read_bytes() == after["img000.txt"]  # same model, same image: same caption


def test_batched_captions_land_in_their_own_files(tmp_path, florence):
    a, b = tmp_path / "a", tmp_path / "b"
    noise_images(a, 8, seed=3)
    shutil.copytree(a, b)
    run_caption(a, florence, batch_size=1)
    run_caption(b, florence, batch_size=5)
    caps_a, caps_b = snapshot(a), snapshot(b)
    texts = {k: v for k, v in caps_a.items() if k.endswith(".txt")}
    assert len(texts) == 8 and texts == {k: v for k, v in caps_b.items() if k.endswith(".txt")}
    assert len(set(texts.values())) >= 5  # the images get different captions, so a mix-up would show


def test_dry_run_writes_nothing_and_prefix_trigger_shape_the_text(photos, florence):
    before = snapshot(photos)
    res = run_caption(photos, florence, dry_run=True, prefix="photo of sks dog, ", suffix=", 4k")
    assert snapshot(photos) == before and not list(photos.glob(".*"))
    assert len(res.planned) == 4 and not res.written
    assert all(t.startswith("photo of sks dog, ") and t.endswith(", 4k") for _, t in res.planned)
    limited = run_caption(photos, florence, dry_run=True, limit=2, trigger="ohwx")
    assert len(limited.planned) == 2 and all(t.startswith("ohwx, ") for _, t in limited.planned)


@pytest.mark.parametrize(("raw", "style", "kw", "want"), [
    ("The image shows a dog on grass.", "short", {}, "a dog on grass."),
    ("A dog sitting next to another dog.", "short", {"trigger": "sks", "class_words": ("dog",)},
     "a sks dog sitting next to another dog."),
    ("Two Dogs on a sofa", "short", {"trigger": "sks", "class_words": ("dog", "puppy")}, "Two sks Dogs on a sofa"),
    ("a cat on a sofa", "short", {"trigger": "sks", "class_words": ("dog",)}, "sks dog, a cat on a sofa"),
    ("a sks dog", "short", {"trigger": "sks", "class_words": ("dog",)}, "a sks dog"),
    ("A red car.", "short", {"prefix": "photo of "}, "photo of a red car."),
    ("1. Dog\n2. grass\n- Dog\n* outdoors.", "tags", {"trigger": "sks", "class_words": ("dog",)},
     "sks dog, grass, outdoors"),
    ('"Red Car, road"', "tags", {}, "red car, road"),
    ("   ", "short", {"prefix": "photo of "}, ""),
])
def test_caption_text_rules(raw, style, kw, want):
    from finetune.caption.text import Binding, finish

    assert finish(raw, style, Binding(**kw)) == want


def test_chat_model_tags_and_styles_a_model_lacks(tmp_path, chat, florence):
    from finetune.errors import ModelError

    folder = tmp_path / "t"
    noise_images(folder, 3)
    res = run_caption(folder, chat, style="tags", batch_size=3)
    assert len(res.written) == 3
    for path, text in res.written:
        assert Path(path).read_text() == text + "\n"
        tags = text.split(", ")
        assert tags and all(t and t == t.lower() and t.strip() == t for t in tags) and len(set(tags)) == len(tags)
    short = run_caption(folder, chat, style="short", overwrite=True, max_new_tokens=4)
    for _, text in short.written:  # only the answer is decoded, not the prompt echoed before it
        assert 1 <= len(text.replace(",", " , ").split()) <= 4, text
    with pytest.raises(ModelError, match="has no 'tags' style"):
        run_caption(folder, florence, style="tags", overwrite=True)


def test_refuses_remote_code_and_mismatched_weights(tmp_path, florence):
    from finetune.caption.models import load_captioner
    from finetune.errors import ModelError

    remote = tmp_path / "remote"
    shutil.copytree(florence, remote)
    cfg = json.loads((remote / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_florence2.Florence2Config"}
    (remote / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="trust_remote_code"):
        load_captioner(str(remote))

    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    shutil.copytree(florence, partial)
    weights = load_file(partial / "model.safetensors")
    dropped = sorted(k for k in weights if "lm_head" not in k)[0]
    save_file({k: v for k, v in weights.items() if k != dropped}, partial / "model.safetensors")
    with pytest.raises(ModelError, match="missing from the checkpoint"):
        load_captioner(str(partial))


def cli(*args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=300, **kw)


def test_cli_help_and_one_line_errors(tmp_path, florence):
    assert cli("--help").returncode == 0
    missing = cli(tmp_path / "nope", "--model", florence)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "does not exist" in missing.stderr
    noise_images(tmp_path / "p", 1)
    bad = cli(tmp_path / "p", "--model", tmp_path / "no-model")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not found" in bad.stderr, bad.stderr
    assert not list((tmp_path / "p").glob("*.txt"))
    from finetune.caption.models import pick_device
    from finetune.errors import ModelError

    with pytest.raises(ModelError, match="--device gpu0: not a device"):
        pick_device("gpu0")


def test_sigterm_leaves_whole_captions_and_the_rerun_resumes(tmp_path, florence):
    folder, ref = tmp_path / "many", tmp_path / "ref"
    noise_images(folder, 60, size=24, seed=7)
    shutil.copytree(folder, ref)
    reference = {Path(p).name: t for p, t in run_caption(ref, florence, batch_size=1).written}

    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(TOOL), str(folder), "--model", str(florence), "--batch-size", "1"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = proc.stdout.readline()
    while first and not first.startswith("img"):  # the first caption written
        first = proc.stdout.readline()
    proc.send_signal(signal.SIGTERM)
    out = first + proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-2000:]
    assert "stopped by SIGTERM" in out and "run the same command again" in out
    done = {p.name: p.read_text() for p in folder.glob("*.txt")}
    assert 1 <= len(done) < 60
    assert all(text == reference[name] + "\n" for name, text in done.items())  # whole captions only
    assert not list(folder.glob(".*"))
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.txt")}

    rerun = run_caption(folder, florence, batch_size=16)  # what running the same command again does
    assert len(rerun.written) == 60 - len(done) and len(rerun.skipped) == len(done)
    final = {p.name: p.read_text() for p in folder.glob("*.txt")}
    assert final == {n: t + "\n" for n, t in reference.items()}
    assert all(folder.joinpath(n).stat().st_mtime_ns == s for n, s in stamps.items())  # first run's files untouched


def test_an_interrupt_while_a_caption_is_written_leaves_the_old_one_whole(tmp_path, florence, monkeypatch):
    """A second Ctrl-C (or a kill) can land while a caption file is being replaced: the file must hold its
    old text or the new one, never a piece, and no temporary file may stay behind."""
    folder = tmp_path / "w"
    noise_images(folder, 3)
    for p in folder.glob("*.png"):
        p.with_suffix(".txt").write_text("an old caption that must survive whole")
    real_replace = os.replace

    def interrupted(src, dst, *a, **k):  # the new text is written; the interrupt lands before the rename
        if str(dst).endswith(".txt"):
            raise KeyboardInterrupt
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_caption(folder, florence, overwrite=True)
    assert {p.read_text() for p in folder.glob("*.txt")} == {"an old caption that must survive whole"}
    assert not list(folder.glob(".*"))
    monkeypatch.setattr(os, "replace", real_replace)
    assert len(run_caption(folder, florence, overwrite=True).written) == 3


def test_stale_temporary_files_of_a_killed_run_are_swept(tmp_path):
    from finetune.caption.run import sweep_temp_files

    imgs = noise_images(tmp_path, 2)
    stale, live = tmp_path / ".img000.txt.ab12cd34.tmp", tmp_path / ".img001.txt.ef56ab78.tmp"
    other = tmp_path / ".notes.txt.0000.tmp"
    for p in (stale, live, other):
        p.write_text("x")
    os.utime(stale, (1e9, 1e9))
    os.utime(other, (1e9, 1e9))
    assert sweep_temp_files(imgs, ".txt") == 1
    assert not stale.exists() and live.exists() and other.exists()  # a live write and foreign files stay


def test_atomic_text_write_never_clobbers(tmp_path):
    from finetune.export.io import move_no_clobber, write_text_new

    target = tmp_path / "a.txt"
    target.write_text("mine")
    with pytest.raises(FileExistsError):
        write_text_new(target, "theirs")
    assert target.read_text() == "mine" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    write_text_new(tmp_path / "b.txt", "new")
    assert (tmp_path / "b.txt").read_text() == "new"
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o666 & ~umask  # readable like any new file
    with pytest.raises(FileExistsError):
        move_no_clobber(tmp_path / "b.txt", target)
    assert target.read_text() == "mine" and (tmp_path / "b.txt").read_text() == "new"
    moved = move_no_clobber(tmp_path / "b.txt", tmp_path / "q" / "b.txt")
    assert moved.read_text() == "new" and not (tmp_path / "b.txt").exists()
