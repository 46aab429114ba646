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

from tests.helpers import build_tiny_sd, build_tiny_sd2, build_tiny_sdxl, draw_images  # noqa: E402


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
