"""tools/dataset.py and finetune.data.hygiene: planted problems are found, with numbers; --fix moves them aside
without deleting or overwriting anything; the perceptual hash tells copies from different images."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import ROOT, tokenizer_dir

TOOL = ROOT / "tools" / "dataset.py"
LONG = "a red circle on a white background, " * 12


@pytest.fixture()
def dataset(tmp_path) -> Path:
    """Toy-world images with captions, plus one of every problem."""
    from finetune.toy.world import world_images

    d = tmp_path / "ds"
    d.mkdir()
    for i, (im, cap) in enumerate(world_images(11, seed=5)):
        im.save(d / f"img{i}.png")
        (d / f"img{i}.txt").write_text(cap)
    shutil.copy(d / "img0.png", d / "img0_copy.png")  # exact duplicate
    (d / "img0_copy.txt").write_text("a copy")
    Image.open(d / "img1.png").convert("RGB").save(d / "img1_reencoded.jpg", quality=60)  # near duplicate
    (d / "img1_reencoded.txt").write_text("re-encoded")
    Image.open(d / "img8.png").resize((24, 24)).save(d / "tiny.png")  # below the resolution
    (d / "img8.png").unlink()
    (d / "img8.txt").rename(d / "tiny.txt")
    Image.open(d / "img9.png").resize((200, 40)).save(d / "wide.png")  # 5:1
    (d / "img9.png").unlink()
    (d / "img9.txt").rename(d / "wide.txt")
    (d / "img2.txt").write_text(LONG)  # over-long caption
    (d / "img3.txt").unlink()  # missing caption
    (d / "img4.txt").write_text(" \n")  # empty caption
    (d / "broken.png").write_bytes((d / "img7.png").read_bytes()[:200])  # truncated
    return d


PLANTED = {
    ("unreadable", "broken.png"), ("duplicate", "img0_copy.png"), ("near-duplicate", "img1_reencoded.jpg"),
    ("small", "tiny.png"), ("aspect", "wide.png"), ("long-caption", "img2.png"), ("empty-caption", "img4.png"),
    ("no-caption", "img3.png"),
}


def test_every_planted_problem_is_reported_and_nothing_else(dataset):
    from transformers import CLIPTokenizer

    from finetune.data.hygiene import HygieneOptions, check_folder

    report = check_folder(dataset, HygieneOptions(resolution=64))
    assert report.images == 14
    assert {(f.kind, Path(f.path).name) for f in report.findings} == PLANTED
    found = {f.kind: f for f in report.findings}
    assert found["duplicate"].other == str(dataset / "img0.png")
    assert found["near-duplicate"].other == str(dataset / "img1.png")
    assert "x2.67" in found["small"].detail  # 64 / 24
    assert "5.00:1" in found["aspect"].detail
    n = len(CLIPTokenizer.from_pretrained(tokenizer_dir())(LONG.strip()).input_ids)
    assert n > 77 and f"{n} tokens: the last {n - 77} fall past the 77-token window" in found["long-caption"].detail
    assert report.window == 77


def test_limits_follow_the_options(dataset):
    from finetune.data.hygiene import HygieneOptions, check_folder

    report = check_folder(dataset, HygieneOptions(resolution=16, max_aspect=6, near_rms=0, max_tokens=200))
    kinds = {f.kind for f in report.findings}
    assert kinds == {"unreadable", "duplicate", "empty-caption", "no-caption"}
    bigger = check_folder(dataset, HygieneOptions(resolution=128))
    assert sum(f.kind == "small" for f in bigger.findings) == 13  # every readable image


def tree(*folders: Path) -> Counter:
    return Counter(p.read_bytes() for f in folders if f.exists() for p in f.rglob("*")
                   if p.is_file() and p.name != "quarantine.log")


def cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=300)


def test_fix_quarantines_offenders_never_deletes_never_overwrites(dataset):
    from finetune.data.hygiene import HygieneOptions, check_folder, format_report
    from finetune.data.quarantine import quarantine

    q = dataset.parent / "ds-quarantine"
    before = tree(dataset)
    text = format_report(check_folder(dataset, HygieneOptions(resolution=64)))
    assert tree(dataset) == before and not q.exists()  # a report reads only
    for kind, name in PLANTED:
        assert f"  {name}: " in text and f"{kind} (1):" in text

    fixed = cli(dataset, "--resolution", "64", "--fix")
    assert fixed.returncode == 0, fixed.stderr
    assert "moved 6 image(s), 11 file(s) in all" in fixed.stdout
    assert tree(dataset, q) == before  # every byte still somewhere: nothing deleted, nothing changed
    moved = {(p.parent.name, p.name) for p in q.rglob("*") if p.is_file() and p.name != "quarantine.log"}
    assert moved == {("unreadable", "broken.png"), ("duplicate", "img0_copy.png"), ("duplicate", "img0_copy.txt"),
                     ("near-duplicate", "img1_reencoded.jpg"), ("near-duplicate", "img1_reencoded.txt"),
                     ("small", "tiny.png"), ("small", "tiny.txt"), ("aspect", "wide.png"), ("aspect", "wide.txt"),
                     ("long-caption", "img2.png"), ("long-caption", "img2.txt")}
    log = (q / "quarantine.log").read_text().splitlines()
    assert sum(not line.startswith("#") for line in log) == 11

    left = check_folder(dataset, HygieneOptions(resolution=64))
    assert {f.kind for f in left.findings} == {"empty-caption", "no-caption"}  # captioning fixes those

    first = (q / "duplicate" / "img0_copy.png").read_bytes()
    shutil.copy(dataset / "img0.png", dataset / "img0_copy.png")  # the same name offends again
    quarantine(check_folder(dataset, HygieneOptions(resolution=64)), q, kinds=("duplicate",))
    assert (q / "duplicate" / "img0_copy.png").read_bytes() == first  # the earlier one is not overwritten
    assert (q / "duplicate" / "img0_copy-1.png").is_file() and not (dataset / "img0_copy.png").exists()


def test_json_report_and_one_line_errors(dataset, tmp_path):
    out = cli(dataset, "--resolution", "64", "--json")
    data = json.loads(out.stdout)
    assert {(f["kind"], Path(f["path"]).name) for f in data["findings"]} == PLANTED
    bad = cli(dataset, "--only", "duplicates")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "did you mean" not in bad.stderr
    assert "not a problem kind" in bad.stderr
    missing = cli(tmp_path / "nowhere")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1


def test_perceptual_hash_tells_copies_from_different_images():
    from finetune.data.phash import dhash, near_duplicates, phash, thumbnail
    from finetune.toy.world import world_images

    originals = [im for im, _ in world_images(40, seed=2)]
    copies = []
    for k, im in enumerate(originals[:10]):
        if k % 2:
            copies.append(im.resize((150, 150), Image.Resampling.LANCZOS))
        else:
            buf = io.BytesIO()
            im.convert("RGB").save(buf, "JPEG", quality=50)
            copies.append(Image.open(io.BytesIO(buf.getvalue())))
    images = originals + copies
    pairs = near_duplicates([phash(i) for i in images], [dhash(i) for i in images], [thumbnail(i) for i in images])
    assert sorted((i, j) for i, j, _ in pairs) == [(k, 40 + k) for k in range(10)]
    assert max(rms for *_, rms in pairs) < 8

    def bits(h, a, b):
        return bin(h(images[a]) ^ h(images[b])).count("1")

    for h in (phash, dhash):  # copies stay within the candidate radius of both hashes ...
        assert max(bits(h, k, 40 + k) for k in range(10)) <= 24, h.__name__
    # ... while most different images fall outside it, so few pairs need their thumbnails compared
    # (dHash alone is weak on flat toy images: pHash does most of the sorting here)
    apart = [max(bits(phash, a, b), bits(dhash, a, b)) for a in range(40) for b in range(a + 1, 40)]
    assert sum(d > 24 for d in apart) / len(apart) > 0.8


def test_token_overflow_at_the_window_edge():
    from finetune.data.tokens import load_tokenizer, overflow

    tok, window = load_tokenizer("toy")
    assert window == 77
    assert overflow(tok, "dog " * 75, window)[:2] == (77, 0)  # 75 words + begin/end markers: exactly fits
    n, lost, tail = overflow(tok, "dog " * 75 + "cat", window)
    assert (n, lost, tail) == (78, 1, "cat")
