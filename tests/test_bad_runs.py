"""The trainer's command line against bad input (issue #21): recipes that must fail at load time, and run
folders a mistaken command must leave byte-identical (a finished run, a refused resume, a damaged checkpoint).

Every case goes through `finetune.run.main`, the code path of `python -m finetune`, and must exit non-zero
with one stderr line naming the key or file, no traceback, and no file changed.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import yaml

from tests.helpers import draw_images, write_recipe


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(argv, capsys) -> tuple[int, str]:
    from finetune.run import main

    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    except Exception as e:  # noqa: BLE001 - what the table looks for: reported as a traceback
        return 1, capsys.readouterr().err + f"Traceback: {type(e).__name__}: {str(e)[:200]}\n"
    return code, capsys.readouterr().err


def refused(code: int, err: str, culprit: str, limit: int = 600) -> list[str]:
    lines = [line for line in err.splitlines() if line.strip()]
    bad = [] if code else [f"exit {code}"]
    if len(lines) != 1 or "Traceback" in err:
        bad.append(f"{len(lines)} stderr lines")
    if culprit not in err:
        bad.append(f"does not name {culprit!r}")
    if len(err) > limit:
        bad.append(f"{len(err)} characters of error")
    return bad


def yaml_files(tmp_path: Path) -> dict[str, Path]:
    deep = tmp_path / "deep.yaml"
    deep.write_text("model: {base: " + "[" * 1000 + "]" * 1000 + "}\n")
    # aliases of aliases inside one value: 300 bytes that expand to 9^6 = 531,441 strings (a message quoting
    # the value whole was megabytes long); each level is defined inside the list that uses it
    levels = ['&a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 6)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(f"model:\n  base: [{', '.join(levels)}]\n")
    return {"deep": deep, "bomb": bomb}


def test_bad_recipes_fail_at_load_time_in_one_short_line(tmp_path, capsys):
    images = draw_images(tmp_path / "images", n=2)
    recipe = write_recipe(tmp_path, "toy", images)
    (tmp_path / "a_file").write_text("x")
    files = yaml_files(tmp_path)
    outside = draw_images(tmp_path / "elsewhere", n=1)
    linked = draw_images(tmp_path / "linked", n=2)
    (linked / "9.png").symlink_to(outside / "0.png")  # an image linking out of its dataset
    capt = draw_images(tmp_path / "capt", n=2)
    (capt / "0.txt").unlink()
    (capt / "0.txt").symlink_to(tmp_path / "a_file")  # a caption linking out
    (tmp_path / "empty").mkdir()
    src = "data.sources.0.path"
    cases = [
        ("missing", [recipe, f"{src}={tmp_path / 'missing'}", "--check"]),
        ("a_file", [recipe, f"{src}={tmp_path / 'a_file'}", "--check"]),
        ("empty", [recipe, f"{src}={tmp_path / 'empty'}", "--check"]),
        ("9.png", [recipe, f"{src}={linked}", "--check"]),
        ("0.txt", [recipe, f"{src}={capt}", "--check"]),
        ("method.alpha", [recipe, "method.alpha=.inf", "--check"]),
        ("train.lr", [recipe, "train.lr=.nan", "--check"]),
        ("train.seed", [recipe, f"train.seed={2**32}", "--check"]),
        ("validation.width", [recipe, "validation.width=100", "--check"]),
        ("validation.seeds", [recipe, "validation.seeds=[-1]", "--check"]),
        ("export.name", [recipe, "export.name=../name", "--check"]),
        ("deep.yaml", [files["deep"], "--check"]),
        ("bomb.yaml", [files["bomb"], "--check"]),
        ("output_dir", [recipe, f"train.output_dir={tmp_path / 'a_file' / 'run'}"]),
    ]
    before, failures = snapshot(tmp_path), []
    for culprit, argv in cases:
        code, err = run_cli(argv, capsys)
        bad = refused(code, err, culprit)
        if bad:
            failures.append(f"{culprit}: {'; '.join(bad)} | {err.strip()[:300]}")
    assert snapshot(tmp_path) == before
    assert not failures, f"{len(failures)} of {len(cases)} failed:\n" + "\n".join(failures)


def test_links_inside_the_dataset_are_followed(tmp_path, capsys):
    """The other half of the link policy: a kohya repeats folder may link images of another one."""
    root = tmp_path / "kohya"
    draw_images(root / "2_sks circle", n=2)
    (root / "1_circle").mkdir()
    (root / "1_circle" / "0.png").symlink_to(root / "2_sks circle" / "0.png")
    recipe = write_recipe(tmp_path, "toy", root)
    code, _ = run_cli([recipe, "data.sources.0.type=kohya", "--check"], capsys)
    assert code == 0


# --------------------------------------------------------------------------------------------- run folders
@pytest.fixture(scope="module")
def finished_run(tiny_base, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 and a latent cache outside the run folder."""
    from tests.helpers import run_trainer

    root = tmp_path_factory.mktemp("runs")
    images = draw_images(root / "images", n=4)
    recipe = write_recipe(root, tiny_base, images, train={"checkpoint_every": 2, "keep_last": 2},
                          data={"cache_latents": True, "crop": "center", "cache_dir": str(root / "cache")})
    run_trainer(recipe)
    return root, recipe


def test_mistaken_runs_leave_the_run_folder_byte_identical(finished_run, tmp_path, capsys):
    from finetune.train.checkpoint import checkpoint_root

    root, recipe = finished_run
    run = tmp_path / "run"
    shutil.copytree(root / "out", run)
    bare = tmp_path / "bare"  # the same finished run, kept without checkpoints
    shutil.copytree(root / "out", bare)
    shutil.rmtree(checkpoint_root(bare))
    damaged = tmp_path / "damaged"
    shutil.copytree(root / "out", damaged)
    newest = sorted(checkpoint_root(damaged).glob("step-*"))[-1]
    optim = next(newest.glob("optimizer*.bin"))
    optim.write_bytes(optim.read_bytes()[: optim.stat().st_size // 2])
    cases = [
        # retraining from step 0 would overwrite the finished LoRA, card and loss log
        ("holds a finished run", [recipe, f"train.output_dir={bare}", "train.resume=latest"]),
        # a changed recipe is refused; the run's recipe.yaml must not take the rejected settings first
        ("changed", [recipe, f"train.output_dir={run}", "train.resume=latest", "train.lr=5e-4", "train.max_steps=6"]),
        # a checkpoint whose optimizer file was cut short after it was written
        (optim.name, [recipe, f"train.output_dir={damaged}", f"train.resume={newest}", "train.max_steps=6"]),
    ]
    failures = []
    for culprit, argv in cases:
        before = snapshot(tmp_path)
        code, err = run_cli(argv, capsys)
        bad = refused(code, err, culprit)
        if snapshot(tmp_path) != before:
            bad.append("files changed")
        if bad:
            failures.append(f"{culprit}: {'; '.join(bad)} | {err.strip()[-300:]}")
    assert not failures, f"{len(failures)} of {len(cases)} failed:\n" + "\n".join(failures)


def test_a_damaged_cache_entry_is_encoded_again_not_a_crash(finished_run, tmp_path, capsys):
    from tests.helpers import run_trainer

    root, recipe = finished_run
    entries = sorted((root / "cache").rglob("*.safetensors"))
    assert entries, "the run cached no latents"
    cut = entries[0]
    good = cut.read_bytes()
    cut.write_bytes(good[: len(good) // 2])
    with pytest.warns(UserWarning, match=f"cache entry .*{cut.name}.* damaged"):
        run_trainer(recipe, f"train.output_dir={tmp_path / 'again'}", "train.checkpoint_every=0")
    from safetensors.torch import load, load_file

    again, before = load_file(cut), load(good)  # encoded again: whole, the same tensors (the VAE samples)
    assert {k: v.shape for k, v in again.items()} == {k: v.shape for k, v in before.items()}
    assert (tmp_path / "again" / "pytorch_lora_weights.safetensors").is_file()
    assert yaml.safe_load((tmp_path / "again" / "recipe.yaml").read_text())["train"]["checkpoint_every"] == 0
