"""Caption rules (table-driven, deterministic), bucketing properties (hypothesis) and image transforms."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from finetune.data.buckets import assign, make_buckets, nearest
from finetune.data.captions import apply_rules, rng_for
from finetune.data.config import CaptionRules
from finetune.data.images import cover, crop_flip, decode, probe, resize

CAPTION = "sks dog, red collar, grass, sunny"

RULES = [
    # (rules, expected caption for every seed, or a check)
    ({}, CAPTION),
    ({"template": "{trigger}, {caption}", "trigger": "zzz"}, "zzz, " + CAPTION),
    ({"template": "photo of {trigger}", "trigger": "zzz"}, "photo of zzz"),
    ({"template": "{trigger}, {caption}", "trigger": "zzz", "caption_dropout": 1.0}, ""),
    ({"tag_dropout": 1.0, "keep_tokens": 1}, "sks dog"),
    ({"tag_dropout": 1.0, "keep_tokens": 2}, "sks dog, red collar"),
    ({"shuffle_tags": True, "keep_tokens": 4}, CAPTION),
]


@pytest.mark.parametrize(("rules", "expected"), RULES)
def test_caption_rules_table(rules, expected):
    r = CaptionRules(**rules)
    for seed in range(5):
        assert apply_rules(CAPTION, r, rng_for(seed, 0, 0)) == expected


def test_empty_caption_leaves_no_dangling_separator():
    r = CaptionRules(template="{trigger}, {caption}", trigger="zzz")
    assert apply_rules("", r) == "zzz"


def test_shuffle_keeps_leading_tags_and_uses_the_separator():
    r = CaptionRules(shuffle_tags=True, keep_tokens=1, separator="|")
    seen = set()
    for seed in range(30):
        out = apply_rules("a|b|c|d", r, rng_for(seed))
        parts = out.split("| ")
        assert parts[0] == "a" and sorted(parts) == ["a", "b", "c", "d"]
        seen.add(out)
    assert len(seen) > 3  # it does shuffle


def test_rules_are_deterministic_per_seed_epoch_index():
    r = CaptionRules(shuffle_tags=True, tag_dropout=0.3, caption_dropout=0.2)
    a = [apply_rules(CAPTION, r, rng_for(7, e, i)) for e in range(3) for i in range(10)]
    b = [apply_rules(CAPTION, r, rng_for(7, e, i)) for e in range(3) for i in range(10)]
    assert a == b and len(set(a)) > 5


def test_dropout_rates_are_respected():
    r = CaptionRules(caption_dropout=0.25)
    dropped = sum(apply_rules(CAPTION, r, rng_for(1, i)) == "" for i in range(2000))
    assert 400 < dropped < 600


# ---------------------------------------------------------------------------------------------- buckets
resolutions = st.sampled_from([256, 512, 768, 1024])
aspects = st.floats(1.0, 4.0)


@settings(max_examples=60, deadline=None)
@given(res=resolutions, max_aspect=aspects, h=st.integers(1, 5000), w=st.integers(1, 5000))
def test_bucket_properties(res, max_aspect, h, w):
    lo, hi = max(64, res // 2 // 64 * 64), res * 2
    buckets = make_buckets(res, lo, hi, max_aspect)
    assert (res, res) in buckets
    for bh, bw in buckets:
        assert bh % 64 == 0 and bw % 64 == 0
        assert bh * bw <= res * res
        assert lo <= min(bh, bw) and max(bh, bw) <= hi
        assert max(bh, bw) / min(bh, bw) <= max_aspect
    got = nearest((h, w), buckets)
    assert got in buckets
    # aspect error bounded: half the largest gap between neighbouring buckets, or the distance to the
    # most extreme bucket for images beyond it
    logs = sorted(math.log(b[1] / b[0]) for b in buckets)
    gap = max((b - a for a, b in zip(logs, logs[1:], strict=False)), default=0.0)
    target = math.log(w / h)
    beyond = max(0.0, logs[0] - target, target - logs[-1])
    assert abs(math.log(got[1] / got[0]) - target) <= max(gap / 2, beyond) + 1e-9


def test_buckets_at_512_cover_common_shapes():
    buckets = make_buckets(512, 256, 1024, 2.0)
    assert nearest((512, 768), buckets) == (384, 640)  # 3:2 landscape -> wide bucket
    assert nearest((768, 512), buckets) == (640, 384)
    assert assign([(100, 100), (100, 100)], buckets) == [(512, 512)] * 2


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 3000), w=st.integers(1, 3000), bh=st.sampled_from([64, 128, 192]),
       bw=st.sampled_from([64, 128, 256]), random=st.booleans(), seed=st.integers(0, 1000))
def test_cover_fills_the_bucket(h, w, bh, bw, random, seed):
    c = cover((h, w), (bh, bw), "random" if random else "center", seed)
    assert c.rh >= bh and c.rw >= bw and (c.rh == bh or c.rw == bw)
    assert 0 <= c.top <= c.rh - bh and 0 <= c.left <= c.rw - bw


# ------------------------------------------------------------------------------------------- transforms
def encoded(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (80, 40), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 40))  # a blue stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW for display
    data = encoded(img, "JPEG", exif=exif, quality=95)
    assert probe(data) == (80, 40)  # (h, w) upright
    out = np.asarray(decode(data))
    assert out.shape == (80, 40, 3)
    assert out[2, 20, 2] > 200 and out[-3, 20, 0] > 200  # the stripe is now at the top


def _transparent_palette() -> Image.Image:
    img = Image.new("RGB", (8, 8), (10, 200, 30)).quantize(4)
    img.info["transparency"] = img.getpixel((0, 0))
    return img


MODES = [
    ("RGBA", lambda: Image.new("RGBA", (8, 8), (0, 0, 0, 0)), (255, 255, 255)),  # transparent -> white
    ("LA", lambda: Image.new("LA", (8, 8), (0, 0)), (255, 255, 255)),
    ("P", lambda: Image.new("RGB", (8, 8), (10, 200, 30)).quantize(4), (10, 200, 30)),
    ("PA", lambda: _transparent_palette(), (255, 255, 255)),
    ("L", lambda: Image.new("L", (8, 8), 77), (77, 77, 77)),
    ("1", lambda: Image.new("1", (8, 8), 1), (255, 255, 255)),
    ("I;16", lambda: Image.fromarray(np.full((8, 8), 65535, np.uint16)), (255, 255, 255)),
    ("CMYK", lambda: Image.new("CMYK", (8, 8), (0, 0, 0, 0)), (255, 255, 255)),
]


@pytest.mark.parametrize(("mode", "make", "rgb"), MODES, ids=[m[0] for m in MODES])
def test_every_mode_becomes_rgb(mode, make, rgb):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = decode(encoded(make(), fmt))
    assert out.mode == "RGB"
    assert np.allclose(np.asarray(out)[4, 4], rgb, atol=3)


def test_crop_and_flip_report_sdxl_offsets():
    img = Image.fromarray(np.arange(30 * 50 * 3, dtype=np.uint8).reshape(30, 50, 3) % 255)
    c = cover((30, 50), (16, 16), "random", seed=3)
    arr = resize(img, c.rh, c.rw)
    out, left = crop_flip(arr, c, (16, 16), flip=False)
    flipped, left_f = crop_flip(arr, c, (16, 16), flip=True)
    assert left == c.left and left_f == c.rw - c.left - 16
    assert np.array_equal(flipped, out[:, ::-1])
