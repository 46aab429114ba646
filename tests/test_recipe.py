"""The recipe loader: every shipped recipe validates, and every kind of bad input names its key."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from finetune.errors import RecipeError
from finetune.recipe import load_recipe, parse_override

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
TRAINING_RECIPES = [p for p in RECIPES if "accelerate" not in p.parts]

MINIMAL = {
    "data": {"sources": [{"type": "folder", "path": "imgs"}], "resolution": 64},
    "method": {"name": "lora"},
}


def write(tmp_path: Path, data, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


@pytest.mark.parametrize("path", TRAINING_RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_recipe_validates(path: Path):
    recipe = load_recipe(path)
    assert recipe.method.name
    # every shipped recipe starts with its launch command, as the style guide asks
    head = path.read_text().splitlines()[:6]
    assert any("finetune/run.py" in line or "python -m finetune" in line for line in head), path


@pytest.mark.parametrize("path", TRAINING_RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_recipe_comments_its_keys(path: Path):
    # each key line carries a comment (on the line or just above it), except for list items and section heads
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        s = line.strip()
        if not s or s.startswith("#") or s.startswith("- ") or s.endswith(":") or s.startswith("extends"):
            continue
        above = lines[i - 1].strip() if i else ""
        assert "#" in line or above.startswith("#"), f"{path.name}:{i + 1} has no comment: {line!r}"


def test_toy_recipes_extend_the_main_ones():
    toy = sorted((ROOT / "recipes" / "toy").glob("*.yaml"))
    assert toy, "recipes/toy/ is empty"
    for p in toy:
        parent = yaml.safe_load(p.read_text()).get("extends")
        assert parent and (p.parent / parent).is_file(), p
        assert load_recipe(p).model.base in ("toy", "toy-flux", "toy-flux-turbo", "toy-video"), p  # a shipped toy base


def test_minimal_recipe_gets_defaults(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL))
    assert r.train.lr == 1e-4 and r.train.mixed_precision == "no"
    assert r.export.formats == ["diffusers", "kohya"]  # what the lora method writes
    assert r.method.rank == 16 and r.method.denoiser_targets()[:2] == ["to_q", "to_k"]


# (overrides applied to MINIMAL, substring the message must hold)
BAD = [
    (["train.lrr=1e-4"], "train.lrr: unknown key (did you mean 'lr'?)"),
    (["trian.lr=1"], "unknown section 'trian' (did you mean 'train'?)"),
    (["method.name=lorra"], "method.name: unknown value 'lorra' (did you mean 'lora'?)"),
    (["method.rnak=4"], "method.rnak: unknown key (did you mean 'rank'?)"),
    (["method.rank=0"], "method.rank: 0 is not valid"),
    (["method.rank=abc"], "method.rank: 'abc' is not valid"),
    (["train.lr=-1"], "train.lr: -1 is not valid"),
    (["train.mixed_precision=fp8"], "train.mixed_precision: 'fp8' is not valid"),
    (["train.max_steps=0"], "train.max_steps: 0 is not valid"),
    (["data.resolution=100"], "data.resolution: 100 is not valid"),
    (["data.sources.0.type=foldr"], "data.sources.0.type: unknown value 'foldr' (did you mean 'folder'?)"),
    (["data.sources.0.caption_ex=.txt"], "data.sources.0.caption_ex: unknown key (did you mean 'caption_ext'?)"),
    (["data.sources.0.path=null"], "data.sources.0.path"),
    (["data.sources=[]"], "data.sources"),
    (["data.crop=random", "data.cache_latents=true"], "cache_latents with crop: random"),
    (["data.cache_text=true", "method.text_encoder.enabled=true"], "data.cache_text cannot be used"),
    (["data.cache_text=true", "data.caption.caption_dropout=0.1"], "data.cache_text with shuffled"),
    (["data.caption.template={trigger} {caption}"], "data.caption: template uses {trigger}"),
    (["method.use_dora=true", "method.adapter=loha"], "method: use_dora works with adapter: lora only"),
    (["export.formats=[diffusers, a1111]"], "export.formats ['a1111'] are not written by method 'lora'"),
    (["export.formats=[onnx]"], "export.formats.0: 'onnx' is not valid"),
    (["validation.seeds=x"], "validation.seeds"),
    (["data.buckets.min_side=100"], "data.buckets.min_side: 100 is not valid"),
    (["data.sources.3.path=x"], "override 'data.sources.3': index must be 0..0"),
    (["train"], "override 'train': expected key.path=value"),
    (["data.masks={unmasked_target: bse}"], "data.masks.unmasked_target: 'bse' is not valid"),
    (["data.masks={base_weight: -1}"], "data.masks.base_weight: -1 is not valid"),
    (["data.masks={unmasked_weight: 2}"], "data.masks.unmasked_weight: 2 is not valid"),
]


@pytest.mark.parametrize(("overrides", "expected"), BAD, ids=[b[1][:40] for b in BAD])
def test_bad_values_name_their_key(tmp_path, overrides, expected):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("model: {base: toy\n", "r.yaml:2:1: YAML syntax error"),
        ("- a\n- b\n", "a recipe is a mapping of sections"),
        ("extends: nothere.yaml\n", "extends 'nothere.yaml', which does not exist"),
        # PyYAML would keep the last of two equal keys silently: refused, with the line of the second
        ("model:\n  base: toy\n  base: x\n", "r.yaml:3: key 'base' is given twice in one mapping (first on line 2)"),
        ("train: {lr: 0.1, lr: 0.2}\n", "r.yaml:1: key 'lr' is given twice"),
        ("model: {base: toy}\nmodel: {base: x}\n", "r.yaml:2: key 'model' is given twice"),
    ],
)
def test_bad_files(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="is a folder"):
        load_recipe(tmp_path)


def test_extends_merges_and_overrides(tmp_path):
    write(tmp_path, {**MINIMAL, "train": {"lr": 0.5, "max_steps": 7}}, "base.yaml")
    child = write(tmp_path, {"extends": "base.yaml", "train": {"lr": 0.25}}, "child.yaml")
    r = load_recipe(child, ["train.seed=3"])
    assert (r.train.lr, r.train.max_steps, r.train.seed) == (0.25, 7, 3)


def test_extends_loop_is_refused(tmp_path):
    write(tmp_path, {"extends": "b.yaml"}, "a.yaml")
    write(tmp_path, {"extends": "a.yaml"}, "b.yaml")
    with pytest.raises(RecipeError, match="loops back"):
        load_recipe(tmp_path / "a.yaml")


@pytest.mark.parametrize(
    ("text", "value"),
    [("a.b=1e-4", 1e-4), ("a.b=true", True), ("a.b=null", None), ("a.b=[1, 2]", [1, 2]),
     ("a.b=hello world", "hello world"), ("a.b=path/to:x", "path/to:x"), ("a.b=", ""),
     ("a.b='no'", "no"), ('a.b="1e-4"', "1e-4"), ("a.b='x: y'", "x: y")],
)
def test_override_values_are_yaml_scalars(text, value):
    assert parse_override(text) == (["a", "b"], value)


@pytest.mark.parametrize(
    ("override", "key", "value"),
    [("train.mixed_precision=no", ("train", "mixed_precision"), "no"),  # YAML 1.1 reads `no` as False
     ("train.mixed_precision='no'", ("train", "mixed_precision"), "no"),
     ("export.name=1.10", ("export", "name"), "1.10"),  # a string field keeps the text as written
     ("model.revision=2024", ("model", "revision"), "2024"),
     ("validation.prompts=[yes, a dog]", ("validation", "prompts"), ["yes", "a dog"]),
     ("train.max_steps=12", ("train", "max_steps"), 12)],
)
def test_overrides_take_the_fields_type(tmp_path, override, key, value):
    r = load_recipe(write(tmp_path, MINIMAL), [override])
    assert getattr(getattr(r, key[0]), key[1]) == value


def test_missing_tracker_is_refused_at_recipe_time(tmp_path, monkeypatch, capsys):
    import finetune.sections as sections
    from finetune.run import main

    monkeypatch.setattr(sections, "_installed", lambda package: package != "wandb")
    path = write(tmp_path, {**MINIMAL, "logging": {"report_to": ["tensorboard", "wandb"]}})
    with pytest.raises(RecipeError, match=r"logging.report_to: 'wandb' is not installed; pip install wandb"):
        load_recipe(path)
    with pytest.raises(SystemExit) as info:
        main([str(path)])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "'wandb' is not installed" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "output").exists()


def test_fingerprint_changes_with_the_recipe(tmp_path):
    path = write(tmp_path, MINIMAL)
    assert load_recipe(path).fingerprint() == load_recipe(path).fingerprint()
    assert load_recipe(path).fingerprint() != load_recipe(path, ["train.lr=0.1"]).fingerprint()


# ---------------------------------------------------------------------------------------------- the CLI
def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "finetune", *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["nope.yaml"], "nope.yaml: recipe file does not exist"),
        (["{r}", "train.lrr=1"], "train.lrr: unknown key (did you mean 'lr'?)"),
        (["{r}", "method.name=dreambooth_xyz"], "method.name: unknown value 'dreambooth_xyz'"),
    ],
)
def test_cli_rejects_bad_input_cleanly(tmp_path, args, expected):
    recipe = write(tmp_path, MINIMAL)
    args = [a.replace("{r}", str(recipe)) for a in args]
    started = time.perf_counter()
    out = run_cli(*args)
    assert out.returncode == 2
    assert expected in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) <= 2
    assert not (tmp_path / "output").exists()
    # the 2 s budget is a benchmark target (tools/bench.py); here we only guard against heavy imports
    assert time.perf_counter() - started < 30


def test_cli_does_not_import_torch_before_validation(tmp_path):
    recipe = write(tmp_path, MINIMAL)
    code = (
        "import sys; from finetune.run import main\n"
        f"try:\n    main([{str(recipe)!r}, 'train.lrr=1'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, 'diffusers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.stdout.strip() == "False False"


def test_cli_print_shows_resolved_recipe(tmp_path):
    recipe = write(tmp_path, MINIMAL)
    out = run_cli(str(recipe), "--print", "train.lr=0.002")
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    assert printed["train"]["lr"] == 0.002 and printed["method"]["name"] == "lora"
    assert set(printed) == {"model", "data", "method", "train", "validation", "export", "logging"}


def test_run_py_works_as_a_script(tmp_path):
    recipe = write(tmp_path, MINIMAL)
    out = subprocess.run(
        [sys.executable, str(ROOT / "finetune" / "run.py"), str(recipe), "--print"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "method:" in out.stdout
