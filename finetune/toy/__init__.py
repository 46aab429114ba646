"""The toy world and the tiny SD-shaped and FLUX-shaped base models that ship with the project.

Importing this is cheap (no torch): `toy_base_path()` and `toy_flux_base_path()` only point at the
committed diffusers folders, which load with `StableDiffusionPipeline.from_pretrained(toy_base_path())`
and `FluxPipeline.from_pretrained(toy_flux_base_path())` like any real base.
"""

from __future__ import annotations

import pathlib

TOY_BASES = {"toy": "base", "toy-flux": "base_flux", "toy-video": "base_video"}  # model.base names of the toy bases


def toy_path(name: str) -> pathlib.Path | None:
    """The folder of a shipped toy base named in `model.base` ('toy', 'toy-flux', 'toy-video'); None otherwise."""
    sub = TOY_BASES.get(name)
    return pathlib.Path(__file__).resolve().parent / sub if sub else None


def toy_base_path() -> pathlib.Path:
    """Folder of the committed toy base model (standard diffusers layout, safetensors only)."""
    return toy_path("toy")


def toy_flux_base_path() -> pathlib.Path:
    """Folder of the committed FLUX-shaped toy base (FluxPipeline layout, safetensors only)."""
    return toy_path("toy-flux")
