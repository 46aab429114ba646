"""The toy world and the tiny SD-shaped base model that ship with the project.

Importing this is cheap (no torch): `toy_base_path()` only points at the committed diffusers folder,
which loads with `StableDiffusionPipeline.from_pretrained(toy_base_path())` like any real base.
"""

from __future__ import annotations

import pathlib


def toy_base_path() -> pathlib.Path:
    """Folder of the committed toy base model (standard diffusers layout, safetensors only)."""
    return pathlib.Path(__file__).resolve().parent / "base"


TOY_BASES = {"toy": "base", "toy-flux": "base_flux"}  # model.base names of the shipped toy bases


def toy_path(name: str) -> pathlib.Path | None:
    """The folder of a shipped toy base named in `model.base` ('toy', 'toy-flux'); None for other values."""
    sub = TOY_BASES.get(name)
    return pathlib.Path(__file__).resolve().parent / sub if sub else None
