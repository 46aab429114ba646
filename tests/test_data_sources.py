"""Every source type on tiny image sets, `check_data` summaries, and bad input of every kind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.data.check import check_data
from finetune.data.scan import count_class_images, scan_data
from finetune.errors import DataError
from finetune.recipe import validate


def image(path: Path, w: int = 96, h: int = 96, seed: int = 0, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def recipe(tmp_path: Path, sources: list[dict], **data):
    data = {"sources": sources, "resolution": 64, **data}
    train = {"batch_size": 2, "seed": 3, "output_dir": str(tmp_path / "out")}
    return validate({"data": data, "method": {"name": "lora"}, "train": train})


def captions(r) -> dict[str, str]:
    scan = scan_data(r.data, verbose=False)
    return {rec.key if rec.path is None else Path(rec.key).name: rec.caption
            for s in scan.subsets for rec in s.records}


# ------------------------------------------------------------------------------------------ the sources
def folder(tmp: Path) -> dict:
    for i in range(3):
        image(tmp / "set" / f"{i}.png", seed=i)
        (tmp / "set" / f"{i}.txt").write_text(f"photo {i}\n", encoding="utf-8")
    image(tmp / "set" / "deep" / "9.jpg")
    return {"type": "folder", "path": str(tmp / "set")}


def folder_recursive(tmp: Path) -> dict:
    return {**folder(tmp), "recursive": True}


def folder_caption_ext(tmp: Path) -> dict:
    image(tmp / "set" / "a.png")
    (tmp / "set" / "a.caption").write_text("custom ext", encoding="utf-8")
    return {"type": "folder", "path": str(tmp / "set"), "caption_ext": ".caption"}


def metadata_jsonl(tmp: Path) -> dict:
    rows = [{"file_name": f"img/{i}.png", "text": f"meta {i}"} for i in range(2)]
    for i in range(2):
        image(tmp / "m" / "img" / f"{i}.png", seed=i)
    (tmp / "m" / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return {"type": "metadata", "path": str(tmp / "m")}


def metadata_csv(tmp: Path) -> dict:
    image(tmp / "m" / "a.png")
    (tmp / "m" / "metadata.csv").write_text('file_name,prompt\na.png,"csv, caption"\n')
    return {"type": "metadata", "path": str(tmp / "m"), "caption_column": "prompt"}


def kohya(tmp: Path) -> dict:
    image(tmp / "k" / "img" / "10_sks dog" / "a.png")
    image(tmp / "k" / "img" / "10_sks dog" / "b.png", seed=1)
    (tmp / "k" / "img" / "10_sks dog" / "b.txt").write_text("sks dog on grass")
    image(tmp / "k" / "img" / "2_dog" / "c.png", seed=2)
    return {"type": "kohya", "path": str(tmp / "k" / "img")}


def kohya_parent(tmp: Path) -> dict:
    return {**kohya(tmp), "path": str(tmp / "k")}  # pointed at the project folder, not img/


def instance(tmp: Path) -> dict:
    image(tmp / "inst" / "a.png")
    image(tmp / "inst" / "b.png", seed=1)
    (tmp / "inst" / "b.txt").write_text("sks dog sleeping")
    return {"type": "instance", "path": str(tmp / "inst"), "instance_prompt": "a photo of sks dog"}


def hf_disk(tmp: Path) -> dict:
    import datasets

    imgs = [Image.fromarray(np.full((80, 72, 3), i * 40, np.uint8)) for i in range(3)]
    ds = datasets.Dataset.from_dict({"img": imgs, "cap": [f"hf {i}" for i in range(3)]},
                                    features=datasets.Features({"img": datasets.Image(), "cap": datasets.Value("string")}))
    ds.save_to_disk(str(tmp / "hfset"))
    return {"type": "hf", "path": str(tmp / "hfset"), "image_column": "img", "caption_column": "cap"}


def hf_imagefolder(tmp: Path) -> dict:
    metadata_jsonl(tmp)
    return {"type": "hf", "path": str(tmp / "m")}


SOURCES = {
    "folder": (folder, {"0.png": "photo 0", "1.png": "photo 1", "2.png": "photo 2"}),
    "folder_recursive": (folder_recursive, {"0.png": "photo 0", "1.png": "photo 1", "2.png": "photo 2", "9.jpg": ""}),
    "folder_caption_ext": (folder_caption_ext, {"a.png": "custom ext"}),
    "metadata_jsonl": (metadata_jsonl, {"0.png": "meta 0", "1.png": "meta 1"}),
    "metadata_csv": (metadata_csv, {"a.png": "csv, caption"}),
    "kohya": (kohya, {"a.png": "sks dog", "b.png": "sks dog on grass", "c.png": "dog"}),
    "kohya_parent": (kohya_parent, {"a.png": "sks dog", "b.png": "sks dog on grass", "c.png": "dog"}),
    "instance": (instance, {"a.png": "a photo of sks dog", "b.png": "sks dog sleeping"}),
    "hf_disk": (hf_disk, {f"hf:{{path}}#{i}": f"hf {i}" for i in range(3)}),
    "hf_imagefolder": (hf_imagefolder, {"hf:{path}#0": "meta 0", "hf:{path}#1": "meta 1"}),
}


@pytest.mark.parametrize("name", SOURCES)
def test_source_reads_images_and_captions(tmp_path, name):
    build, expected = SOURCES[name]
    src = build(tmp_path)
    expected = {k.format(path=src["path"]): v for k, v in expected.items()}
    r = recipe(tmp_path, [src])
    assert captions(r) == expected
    text = check_data(r)
    assert f"{len(expected)} images" in text and "64x64: " in text and "problems:" in text


def test_kohya_repeats_come_from_folder_names(tmp_path):
    r = recipe(tmp_path, [{**kohya(tmp_path), "repeats": 2}])
    scan = scan_data(r.data, verbose=False)
    assert sorted((Path(s.name).name, s.repeats, len(s.records)) for s in scan.subsets) == [
        ("10_sks dog", 20, 2), ("2_dog", 4, 1)]
    assert scan.num_examples == 2 * 20 + 4


def test_toy_source(tmp_path):
    from finetune.toy import world
    subject = next(iter(world.SUBJECTS))
    r = recipe(tmp_path, [{"type": "toy", "count": 3}, {"type": "toy", "subject": subject, "count": 2,
                                                         "prompt": "a sks thing"}])
    caps = captions(r)
    assert len(caps) == 5 and caps[f"toy:{subject}#1"] == "a sks thing"
    assert all(c for c in caps.values())
    assert "toy:world" in check_data(r)


def test_check_data_does_not_import_torch(tmp_path):
    sources = [folder(tmp_path), hf_disk(tmp_path), metadata_jsonl(tmp_path)]
    code = (
        "import sys; from finetune.recipe import validate; from finetune.data.check import check_data\n"
        f"r = validate({{'data': {{'sources': {sources!r}, 'resolution': 64}}, 'method': {{'name': 'lora'}}}})\n"
        "print(check_data(r)); assert 'torch' not in sys.modules, 'torch imported'"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.getcwd())
    assert out.returncode == 0, out.stderr
    assert "8 images" in out.stdout


def test_subsets_with_their_own_rules_and_repeats(tmp_path):
    a = {**instance(tmp_path), "repeats": 5}
    b = {**metadata_csv(tmp_path), "caption": {"template": "{trigger}, {caption}", "trigger": "zzz"}}
    r = recipe(tmp_path, [a, b])
    text = check_data(r)
    assert "2 images x 5 repeats" in text and "'zzz, csv, caption'" in text
    assert "11 examples per epoch" in text


def test_prior_class_images_are_counted_and_loaded(tmp_path):
    for i in range(3):
        image(tmp_path / "cls" / f"{i}.png", seed=i)
    prior = {"class_prompt": "a photo of a dog", "class_dir": str(tmp_path / "cls"), "num_class_images": 5}
    r = recipe(tmp_path, [instance(tmp_path)], prior=prior)
    assert count_class_images(r.data.prior) == 3
    scan = scan_data(r.data, verbose=False)
    assert scan.prior is not None and len(scan.prior.records) == 3
    assert {rec.caption for rec in scan.prior.records} == {"a photo of a dog"}
    assert "class images to generate before training: 2" in check_data(r)


def test_prior_without_class_images(tmp_path):
    prior = {"class_prompt": "a dog", "class_dir": str(tmp_path / "none"), "num_class_images": 4}
    r = recipe(tmp_path, [instance(tmp_path)], prior=prior)
    assert "class images to generate before training: 4" in check_data(r)
    with pytest.raises(DataError, match="no class images"):
        scan_data(r.data, verbose=False)


# ------------------------------------------------------------------------------------------- bad input
def corrupt(tmp: Path) -> tuple[dict, str]:
    folder(tmp)
    data = (tmp / "set" / "1.png").read_bytes()
    (tmp / "set" / "1.png").write_bytes(data[: len(data) // 2])  # truncated
    return {"type": "folder", "path": str(tmp / "set")}, "1.png: is corrupt or truncated"


def truncated_jpeg(tmp: Path) -> tuple[dict, str]:
    folder(tmp)
    image(tmp / "set" / "j.jpg", 400, 300, fmt="JPEG")
    data = (tmp / "set" / "j.jpg").read_bytes()
    (tmp / "set" / "j.jpg").write_bytes(data[: len(data) * 2 // 3])
    return {"type": "folder", "path": str(tmp / "set")}, "j.jpg: is corrupt or truncated"


def not_an_image(tmp: Path) -> tuple[dict, str]:
    folder(tmp)
    (tmp / "set" / "notes.jpg").write_text("this is text")
    return {"type": "folder", "path": str(tmp / "set")}, "notes.jpg: not an image PIL can read"


def caption_not_utf8(tmp: Path) -> tuple[dict, str]:
    folder(tmp)
    (tmp / "set" / "2.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    return {"type": "folder", "path": str(tmp / "set")}, "2.txt: caption file is not UTF-8"


def too_small(tmp: Path) -> tuple[dict, str]:
    folder(tmp)
    image(tmp / "set" / "tiny.png", 40, 30)
    return {"type": "folder", "path": str(tmp / "set")}, "tiny.png: is 40x30, smaller than the smallest bucket"


def missing_listed_file(tmp: Path) -> tuple[dict, str]:
    src = metadata_jsonl(tmp)
    with open(tmp / "m" / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "img/gone.png", "text": "x"}) + "\n")
    return src, "file_name 'img/gone.png' does not exist"


SKIPPABLE = [corrupt, truncated_jpeg, not_an_image, caption_not_utf8, too_small, missing_listed_file]


@pytest.mark.parametrize("case", SKIPPABLE, ids=lambda f: f.__name__)
def test_bad_file_is_an_error_naming_it(tmp_path, case):
    src, message = case(tmp_path)
    with pytest.raises(DataError, match=message) as e:
        scan_data(recipe(tmp_path, [src]).data, verbose=False)
    assert "on_bad_image: skip" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("case", SKIPPABLE, ids=lambda f: f.__name__)
def test_bad_file_skipped_with_a_warning_and_counted(tmp_path, case, capsys):
    src, message = case(tmp_path)
    text = check_data(recipe(tmp_path, [src], on_bad_image="skip"))
    warned = capsys.readouterr().err.strip().splitlines()
    assert len(warned) == 1 and warned[0].startswith("warning: skipping ") and message.split(": ", 1)[-1] in warned[0]
    assert "1 file(s) skipped" in text and message.split(": ", 1)[-1] in text


def escape_dotdot(tmp: Path) -> tuple[dict, str]:
    src = metadata_jsonl(tmp)
    image(tmp / "outside.png")
    (tmp / "m" / "metadata.jsonl").write_text(json.dumps({"file_name": "../outside.png", "text": "x"}))
    return src, "points outside"


def escape_absolute(tmp: Path) -> tuple[dict, str]:
    src = metadata_jsonl(tmp)
    (tmp / "m" / "metadata.jsonl").write_text(json.dumps({"file_name": str(image(tmp / "o.png")), "text": "x"}))
    return src, "absolute path"


def escape_symlink(tmp: Path) -> tuple[dict, str]:
    src = metadata_jsonl(tmp)
    (tmp / "m" / "img" / "link.png").symlink_to(image(tmp / "secret.png"))
    (tmp / "m" / "metadata.jsonl").write_text(json.dumps({"file_name": "img/link.png", "text": "x"}))
    return src, "points outside"


def empty_folder(tmp: Path) -> tuple[dict, str]:
    (tmp / "empty").mkdir()
    return {"type": "folder", "path": str(tmp / "empty")}, "no images found"


def nested_only(tmp: Path) -> tuple[dict, str]:
    image(tmp / "top" / "sub" / "a.png")
    return {"type": "folder", "path": str(tmp / "top")}, "set recursive: true"


def missing_folder(tmp: Path) -> tuple[dict, str]:
    return {"type": "instance", "path": str(tmp / "nope"), "instance_prompt": "x"}, "folder does not exist"


def wrong_caption_ext(tmp: Path) -> tuple[dict, str]:
    image(tmp / "set" / "a.png")
    (tmp / "set" / "a.caption").write_text("a caption")
    return {"type": "folder", "path": str(tmp / "set")}, "set caption_ext: '.caption'"


def missing_caption_column(tmp: Path) -> tuple[dict, str]:
    return {**metadata_jsonl(tmp), "caption_column": "prompt"}, "no 'prompt' column"


def no_metadata(tmp: Path) -> tuple[dict, str]:
    image(tmp / "m" / "a.png")
    return {"type": "metadata", "path": str(tmp / "m")}, "no metadata.jsonl or metadata.csv"


def kohya_flat(tmp: Path) -> tuple[dict, str]:
    image(tmp / "flat" / "a.png")
    return {"type": "kohya", "path": str(tmp / "flat")}, "no kohya sub-folders"


def hf_missing_column(tmp: Path) -> tuple[dict, str]:
    return {**hf_disk(tmp), "caption_column": "text"}, "no column 'text'"


def hf_missing(tmp: Path) -> tuple[dict, str]:
    return {"type": "hf", "path": str(tmp / "no-such-dataset")}, "could not load the dataset"


FATAL = [escape_dotdot, escape_absolute, escape_symlink, empty_folder, nested_only, missing_folder,
         wrong_caption_ext, missing_caption_column, no_metadata, kohya_flat, hf_missing_column, hf_missing]


@pytest.mark.parametrize("case", FATAL, ids=lambda f: f.__name__)
def test_fatal_problems_are_one_line_data_errors(tmp_path, case):
    src, message = case(tmp_path)
    with pytest.raises(DataError, match=message) as e:
        check_data(recipe(tmp_path, [src], on_bad_image="skip"))
    assert "\n" not in str(e.value)


def test_subset_with_nothing_left_after_skipping(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_text("no")
    r = recipe(tmp_path, [{"type": "folder", "path": str(tmp_path / "bad")}], on_bad_image="skip")
    with pytest.raises(DataError, match="subset has no usable images"):
        scan_data(r.data)


def test_missing_captions_are_reported_not_silent(tmp_path):
    src = folder(tmp_path)
    image(tmp_path / "set" / "nocap.png")
    text = check_data(recipe(tmp_path, [src]))
    assert "1 image(s) without a .txt caption" in text and "nocap.png" in text


def test_fingerprint_changes_with_the_data(tmp_path):
    src = folder(tmp_path)
    r = recipe(tmp_path, [src])
    first = scan_data(r.data, verbose=False).fingerprint()
    assert scan_data(r.data, verbose=False).fingerprint() == first
    (tmp_path / "set" / "0.txt").write_text("changed caption")
    second = scan_data(r.data, verbose=False).fingerprint()
    image(tmp_path / "set" / "1.png", seed=99)
    third = scan_data(r.data, verbose=False).fingerprint()
    assert len({first, second, third}) == 3


# ------------------------------------------------------------------------------------------- the CLI
def _cli(tmp: Path, source: dict) -> subprocess.CompletedProcess:
    import yaml

    recipe_file = tmp / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump({"data": {"sources": [source], "resolution": 64},
                                           "method": {"name": "lora"}}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "finetune", str(recipe_file), "--check"],
                          capture_output=True, text=True, env=env)


def test_cli_check_prints_the_summary(tmp_path):
    out = _cli(tmp_path, kohya(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "3 images" in out.stdout and "x 10 repeats" in out.stdout and "'sks dog on grass'" in out.stdout


def test_cli_check_bad_data_exits_2_with_one_line(tmp_path):
    src, message = not_an_image(tmp_path)
    out = _cli(tmp_path, src)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: ") and message in out.stderr and len(out.stderr.strip().splitlines()) == 1
