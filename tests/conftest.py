"""Shared fixtures: tests never touch the network, and build or use small models."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# one torch thread (this process and the runs it starts): the tiny test models gain nothing from intra-op
# threads, and on a busy machine OpenMP's spinning threads cost more CPU than the work (a 4-step tiny run:
# 1.1 s of CPU with one thread, 29 s with two on a loaded 2-core machine); set it yourself to override
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.helpers import (  # noqa: E402
    TOY_SMALL,
    build_tiny_sd,
    build_tiny_sd2,
    build_tiny_sdxl,
    cli,
    draw_images,
    own_pictures,
)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny") / "sd")


@pytest.fixture()
def images(tmp_path) -> Path:
    return draw_images(tmp_path / "images")


@pytest.fixture(scope="session")
def tiny_sd2_base(tmp_path_factory) -> Path:
    return build_tiny_sd2(tmp_path_factory.mktemp("tiny") / "sd2v")


@pytest.fixture(scope="session")
def tiny_sdxl_base(tmp_path_factory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny") / "sdxl")


@pytest.fixture(scope="session")
def pictures(tmp_path_factory) -> Path:
    """A newcomer's folder of 13 own pictures: one corrupt, one tiny, one duplicate (helpers.own_pictures)."""
    folder = tmp_path_factory.mktemp("own") / "pictures"
    own_pictures(folder)
    return folder


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory):
    """(the finished process, its run folder): the shipped toy recipe cut to one step, with its grids and metrics."""
    out = tmp_path_factory.mktemp("toy_run") / "run"
    done = cli("-m", "finetune", "recipes/toy/lora.yaml", "data.sources.0.count=8", f"train.output_dir={out}",
               "train.max_steps=1", *TOY_SMALL)
    assert done.returncode == 0, done.stderr[-2000:]
    return done, out
