"""A newcomer's first hour (issue 34), items 7-11: subcommands and start-up, --check's counts, generate's output,
trigger words, the studio's printed address. Start-up (issue 41): the commands that read a header or a recipe
import no torch, diffusers or transformers (measured by tools/bench_startup.py, never timed here)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest

from tests.helpers import ROOT, cli

HEAVY = ("torch", "diffusers", "transformers")


def imported(*args) -> set[str]:
    """The top-level packages `python ARGS` imports (python -X importtime), after checking it exits 0."""
    done = cli("-X", "importtime", *args)
    assert done.returncode == 0, done.stderr[-2000:]
    names = re.findall(r"^import time:\s+\d+ \|\s+\d+ \| \s*([\w.]+)$", done.stderr, re.M)
    return {n.split(".")[0] for n in names}


# ------------------------------------------------------------------------------ 7. subcommands, start-up
def test_help_lists_the_subcommands_and_each_has_its_own_help():
    done = cli("-m", "finetune", "--help")
    for command in ("finetune estimate RECIPE", "finetune studio", "finetune env", "finetune --resume RUN_DIR"):
        assert command in done.stdout, command
    estimate = cli("-m", "finetune", "estimate", "--help")
    assert estimate.returncode == 0 and estimate.stdout.startswith("usage: finetune estimate")
    assert "--check" not in estimate.stdout  # not the trainer's options


def test_estimate_prints_its_table_and_nothing_from_the_libraries():
    done = cli("-m", "finetune", "estimate", "recipes/toy/lora.yaml")
    assert done.returncode == 0 and done.stdout.startswith("memory estimate for toy"), done.stderr
    assert done.stderr == ""


@pytest.mark.parametrize("args", [["-m", "finetune", "--help"], ["-m", "finetune", "recipes/toy/lora.yaml", "--check"],
                                  ["-m", "finetune", "recipes/toy/lora.yaml", "--print"],
                                  ["-m", "finetune", "studio", "--help"]], ids=["help", "check", "print", "studio"])
def test_reading_a_recipe_imports_no_heavy_library(args):
    assert not imported(*args) & set(HEAVY)


def test_inspecting_a_file_imports_no_heavy_library(toy_run):
    _, run = toy_run
    packages = imported("tools/inspect_file.py", str(run / "pytorch_lora_weights.safetensors"))
    assert not packages & set(HEAVY), packages & set(HEAVY)


def test_the_studio_app_starts_without_heavy_libraries():
    code = ("import sys; from finetune.studio.app import Studio, create_app; "
            f"create_app(Studio.make({str(ROOT)!r})); print(sorted(set({HEAVY!r}) & set(sys.modules)))")
    done = cli("-c", code)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


# --------------------------------------------------------------------------------- 8. --check's counts
def test_check_counts_only_the_images_it_loaded(tmp_path):
    from finetune.data.check import check_data
    from finetune.recipe import load_recipe
    from tests.helpers import own_pictures

    own_pictures(tmp_path / "pics")
    recipe = load_recipe(ROOT / "recipes/toy/lora.yaml", [f"data.sources.0={{type: folder, path: {tmp_path / 'pics'}}}",
                                                          "data.masks=null", "data.on_bad_image=skip"])
    text = check_data(recipe)
    # 13 files: photo_01/03/05/07/09 and the duplicate have no caption; corrupt.jpg and tiny.png are skipped
    assert "6 image(s) without a .txt caption train on an empty caption, e.g." in text
    assert "'an empty caption'" not in text
    assert all(line == line.rstrip() for line in text.splitlines())


# ------------------------------------------------------------------------------ 9. generate's output
def test_generate_writes_under_output_and_shows_its_defaults(tmp_path, toy_run):
    _, run = toy_run
    shown = cli("tools/generate.py", "--help").stdout
    for flag, default in (("--steps", "(default 30)"), ("--guidance", "(default 7.5)"),
                          ("--out", "(default: output/generated/")):
        entry = shown.split(f"\n  {flag} ")[1].split("\n  --")[0]  # the flag's own help, wrapped over lines
        assert default in " ".join(entry.split()), flag
    for n in range(2):
        done = cli(str(ROOT / "tools/generate.py"), "a sks heart", "--base", "toy", "--lora", str(run),
                   "--steps", "2", "--seeds", "0", cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"wrote output/generated/run-{n:03d}.png" in done.stdout  # named after the LoRA's run
        assert "generating" in done.stderr  # a progress bar over the images
    assert [p.name for p in tmp_path.iterdir()] == ["output"]  # nothing else in the current folder


# ------------------------------------------------------------------------------- 10. trigger words kept
def test_the_validation_token_in_the_captions_is_a_trigger_word(toy_run):
    _, run = toy_run
    for name in ("pytorch_lora_weights.safetensors", "run.safetensors"):
        done = cli("tools/inspect_file.py", str(run / name), "--json")
        assert done.returncode == 0, done.stderr
        info = json.loads(done.stdout)
        assert info["trigger_words"] == ["sks"], (name, info["trigger_words"])
    meta = json.loads(cli("tools/inspect_file.py", str(run / "run.safetensors"), "--json").stdout)["metadata"]
    assert meta["modelspec.trigger_phrase"] == "sks"


def test_a_token_the_captions_never_hold_is_no_trigger_word(tmp_path, images):
    from finetune.export.context import trigger_words
    from finetune.recipe import load_recipe
    from tests.helpers import write_recipe

    r = load_recipe(write_recipe(tmp_path, "toy", images, validation={"token": "zwx", "prompts": ["a zwx circle"]}))
    assert trigger_words(r) == []  # the images say 'a sks circle': 'zwx' was never trained on


# ------------------------------------------------------------------------- 11. the studio's printed address
def test_a_wildcard_bind_prints_addresses_another_machine_can_open(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "finetune", "studio", "--host", "0.0.0.0", "--port", str(port),
                             "--root", str(tmp_path)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    url = first.split()[2]
    assert url.startswith("http://") and "0.0.0.0" not in url and f":{port}/?token=" in url, first
    host = url.removeprefix("http://").rsplit(":", 1)[0]
    assert host and not host.startswith("127.")  # loopback is printed too, after the address others can open
