"""Paired data (data.conditioning): records carry conditioning images in every layout (target/ + control/ folders,
metadata columns, datasets columns), the images follow their target through buckets, crops and flips (spatial) or
take their own size (references), are cached with it under keys that hold every input, and every bad pair is one
line before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from finetune.data.scan import scan_data
from finetune.errors import DataError
from finetune.recipe import validate


def image(path: Path, w: int = 96, h: int = 80, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def pairs(tmp: Path, n: int = 3, dirs=("control",), same: bool = True, w: int = 96, h: int = 80) -> Path:
    """target/i.png + caption and one image per conditioning folder; `same`: each control is its target's copy
    (so a spatial control must come out of the loader exactly as its target)."""
    root = tmp / "pairs"
    for i in range(n):
        image(root / "target" / f"{i}.png", w, h, seed=i)
        (root / "target" / f"{i}.txt").write_text(f"make it {i}")
        for k, d in enumerate(dirs):
            image(root / d / f"{i}.png", w, h, seed=i if same else 100 + 10 * k + i)
    return root


def recipe(tmp: Path, sources: list[dict], conditioning: dict | None = None, **data):
    data = {"sources": sources, "resolution": 64, "conditioning": conditioning or {}, "buckets": {"enabled": True},
            **data}
    train = {"batch_size": 2, "seed": 3, "output_dir": str(tmp / "out")}
    # a family that takes several conditioning images (named, so no base is looked at)
    return validate({"model": {"family": "flux2_klein"}, "data": data, "method": {"name": "lora"}, "train": train})


def folder_src(root: Path) -> dict:
    return {"type": "folder", "path": str(root)}


def build(r, **kwargs):
    from finetune.data import build_train_data

    return build_train_data(r, show_progress=False, **kwargs)


# ------------------------------------------------------------------------------------------ layouts
def test_folder_pairs_are_matched_by_stem(tmp_path):
    root = pairs(tmp_path, dirs=("control_1", "control_2"), same=False)
    scan = scan_data(recipe(tmp_path, [folder_src(root)], {"count": 2}).data, verbose=False)
    recs = scan.subsets[0].records
    assert [Path(r.key).name for r in recs] == ["0.png", "1.png", "2.png"]
    for r in recs:
        stem = Path(r.key).stem
        assert [Path(c.key).parent.name for c in r.conditions] == ["control_1", "control_2"]
        assert all(Path(c.key).stem == stem and c.role == "spatial" for c in r.conditions)
    assert recs[0].caption == "make it 0"


def test_metadata_columns_and_lists(tmp_path):
    root = tmp_path / "m"
    for i in range(2):
        image(root / f"t{i}.png", seed=i)
        image(root / f"c{i}.png", seed=10 + i)
        image(root / f"d{i}.png", seed=20 + i)
    rows = [{"file_name": "t0.png", "text": "a", "control_image": ["c0.png", "d0.png"]},
            {"file_name": "t1.png", "text": "b", "control_image_1": "c1.png", "control_image_2": "d1.png"}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    r = recipe(tmp_path, [{"type": "metadata", "path": str(root)}], {"count": 2, "role": "reference"})
    scan = scan_data(r.data, verbose=False)
    recs = scan.subsets[0].records
    assert [[Path(c.key).name for c in rec.conditions] for rec in recs] == [["c0.png", "d0.png"], ["c1.png", "d1.png"]]
    assert all(c.role == "reference" for rec in recs for c in rec.conditions)
    assert not any("not listed" in n for n in scan.subsets[0].notes)  # conditioning images are listed too


def test_datasets_columns(tmp_path):
    import datasets

    imgs = [Image.fromarray(np.full((80, 96, 3), i * 40, np.uint8)) for i in range(3)]
    ctrl = [Image.fromarray(np.full((80, 96, 3), 200 - i * 40, np.uint8)) for i in range(3)]
    ds = datasets.Dataset.from_dict(
        {"img": imgs, "cap": [f"hf {i}" for i in range(3)], "control_image": ctrl},
        features=datasets.Features({"img": datasets.Image(), "cap": datasets.Value("string"),
                                    "control_image": datasets.Image()}))
    ds.save_to_disk(str(tmp_path / "hf"))
    src = {"type": "hf", "path": str(tmp_path / "hf"), "image_column": "img", "caption_column": "cap"}
    recs = scan_data(recipe(tmp_path, [src]).data, verbose=False).subsets[0].records
    assert len(recs) == 3 and all(len(r.conditions) == 1 for r in recs)
    assert Image.open(__import__("io").BytesIO(recs[1].conditions[0].read())).getpixel((0, 0)) == (160, 160, 160)


# ------------------------------------------------------------------------------------------ geometry
@pytest.mark.parametrize("crop", ["center", "random"])
def test_spatial_images_follow_their_target_through_buckets_crops_and_flips(tmp_path, crop):
    """Each control is a copy of its target: whatever the bucket, crop and flip, the loader's pixels agree."""
    root = pairs(tmp_path, n=4, w=330, h=200)
    r = recipe(tmp_path, [folder_src(root)], crop=crop, random_flip=True, resolution=256)
    data = build(r)
    seen_flip = False
    for epoch in range(3):
        for batch in data.loader(epoch):
            (cond,) = batch["reference_pixels"]
            assert batch["pixel_values"].shape[-2] != batch["pixel_values"].shape[-1]  # an aspect bucket
            assert torch.equal(cond, batch["pixel_values"])
    for ex in sum(data.plan(0) + data.plan(1) + data.plan(2), []):
        seen_flip |= ex.flip
    assert seen_flip


def test_references_take_their_own_size_and_are_never_flipped(tmp_path):
    root = pairs(tmp_path, n=2, w=96, h=96)
    r = recipe(tmp_path, [folder_src(root)], {"role": "reference", "resolution": 128}, random_flip=True)
    data = build(r)
    flips = []
    for epoch in range(3):
        for batch, plan in zip(data.loader(epoch), data.plan(epoch), strict=True):
            (cond,) = batch["reference_pixels"]
            assert cond.shape[-2:] == (128, 128) and batch["pixel_values"].shape[-2:] == (64, 64)
            ref = torch.nn.functional.interpolate(cond, size=(64, 64), mode="area")
            for i, ex in enumerate(plan):  # a reference is its target, larger, never flipped
                px = batch["pixel_values"][i]
                upright, mirrored = (px.flip(-1), px) if ex.flip else (px, px.flip(-1))
                assert (ref[i] - upright).abs().mean() < 0.5 * (ref[i] - mirrored).abs().mean()
                flips.append(ex.flip)
    assert any(flips) and not all(flips)


def test_conditioning_latents_are_cached_under_keys_holding_every_input(tmp_path):
    root = pairs(tmp_path, n=2, same=False)
    r = recipe(tmp_path, [folder_src(root)], cache_latents=True, random_flip=True, cache_dir=str(tmp_path / "c"))
    calls = []

    def encoder(px):  # a stand-in VAE: 8x8 average pooling, deterministic
        calls.append(len(px))
        return torch.nn.functional.avg_pool2d(px, 8)

    data = build(r, latent_encoder=encoder, latent_key="k")
    batch = next(iter(data.loader(0)))
    (cond,) = batch["references"]
    assert cond.shape == batch["latents"].shape and "reference_pixels" not in batch
    plain = build(recipe(tmp_path, [folder_src(root)], random_flip=True))
    ex = data.plan(0)[0][0]
    px = plain.render.conditions(ex.record, ex.bucket, ex.flip)[0]
    assert torch.allclose(cond[0], encoder(px[None])[0])  # the flipped or unflipped cached latents, as planned
    calls.clear()
    build(r, latent_encoder=encoder, latent_key="k")
    assert calls == []  # all cached
    image(root / "control" / "1.png", seed=77)  # a changed conditioning image is a new entry
    build(r, latent_encoder=encoder, latent_key="k")
    assert sum(calls) == 1 * 4  # one record: target, flipped target, control, flipped control (each a call)


def test_text_reading_the_conditions_is_keyed_on_them(tmp_path):
    root = pairs(tmp_path, n=2, same=False)
    (root / "target" / "1.txt").write_text("make it 0")  # both records share a caption
    r = recipe(tmp_path, [folder_src(root)], cache_text=True, cache_dir=str(tmp_path / "c"))
    seen = []

    def text(captions, images=None):
        seen.append((list(captions), None if images is None else [i.shape for i in images]))
        return {"prompt_embeds": images[0].mean((1, 2, 3))[:, None]}

    data = build(r, text_encoder=text, text_key="t", text_reads_conditions=True)
    assert len(seen) == 1 and len(seen[0][0]) == 2  # one caption, two records: two entries
    batch = next(iter(data.loader(0)))
    want = batch["reference_pixels"][0].mean((1, 2, 3))[:, None]
    assert torch.allclose(batch["text"]["prompt_embeds"], want)


# ------------------------------------------------------------------------------------------ bad pairs
def missing(tmp):
    root = pairs(tmp)
    (root / "control" / "1.png").unlink()
    return root, "1.png: has no conditioning image in control/"


def extra(tmp):
    root = pairs(tmp)
    image(root / "control" / "7.png")
    return root, "7.png: matches no target in target/"


def stems_differ(tmp):
    root = pairs(tmp)
    (root / "control" / "2.png").rename(root / "control" / "2_input.png")
    return root, "2_input.png matches no target: pairs are matched by file stem"


def mismatched_size(tmp):
    root = pairs(tmp)
    image(root / "control" / "0.png", 80, 80)
    return root, "0.png: is 80x80 but its target"


def corrupt(tmp):
    root = pairs(tmp)
    data = (root / "control" / "2.png").read_bytes()
    (root / "control" / "2.png").write_bytes(data[: len(data) // 2])
    return root, "2.png: is corrupt or truncated"


def no_control_folder(tmp):
    root = pairs(tmp, dirs=())
    return root, "no control/ folder"


BAD = [missing, extra, stems_differ, mismatched_size, corrupt, no_control_folder]


@pytest.mark.parametrize("case", BAD, ids=lambda f: f.__name__)
def test_every_bad_pair_is_one_line_before_any_model_loads(tmp_path, case, capsys):
    """`--check` and a training run both stop at the pair: the training base does not exist, so reaching the
    model would be a different error."""
    root, message = case(tmp_path)
    data = {"sources": [folder_src(root)], "resolution": 64, "conditioning": {}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": {"base": str(tmp_path / "no-base")}, "data": data,
                                    "method": {"name": "lora"}, "train": {"output_dir": str(tmp_path / "o")},
                                    "logging": {"report_to": []}}))
    from finetune.run import main

    for extra_args in (["--check"], []):
        with pytest.raises(SystemExit) as done:
            main([str(path), *extra_args])
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert done.value.code == 2 and len(lines) == 1 and message in lines[0], (extra_args, err[-2000:])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", [missing, extra, mismatched_size, corrupt], ids=lambda f: f.__name__)
def test_bad_pairs_are_skipped_whole_when_asked(tmp_path, case, capsys):
    root, message = case(tmp_path)
    r = recipe(tmp_path, [folder_src(root)], on_bad_image="skip")
    scan = scan_data(r.data, verbose=True)
    assert message in capsys.readouterr().err
    recs = scan.subsets[0].records
    assert all(len(rec.conditions) == 1 for rec in recs) and len(recs) == (3 if case is extra else 2)


def test_recipe_refuses_sources_without_a_paired_layout(tmp_path):
    from finetune.errors import RecipeError

    with pytest.raises((RecipeError, ValueError), match="type 'kohya' has no paired layout"):
        recipe(tmp_path, [{"type": "kohya", "path": str(tmp_path)}])
    with pytest.raises((RecipeError, ValueError), match="resolution applies to role: reference"):
        recipe(tmp_path, [folder_src(tmp_path)], {"resolution": 128})


def test_records_without_pairs_in_a_paired_recipe_are_refused(tmp_path):
    root = pairs(tmp_path)
    meta = tmp_path / "m"
    image(meta / "a.png")
    (meta / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x"}))
    with pytest.raises(DataError, match="no 'control_image' column"):
        scan_data(recipe(tmp_path, [folder_src(root), {"type": "metadata", "path": str(meta)}]).data, verbose=False)


def test_check_prints_the_conditioning(tmp_path):
    from finetune.data.check import check_data

    root = pairs(tmp_path)
    text = check_data(recipe(tmp_path, [folder_src(root)], {"role": "reference"}))
    assert "conditioning: 1 reference image(s) per record" in text
