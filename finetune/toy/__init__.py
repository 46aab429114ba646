"""The toy world and the tiny SD-shaped and FLUX-shaped base models that ship with the project.

Importing this is cheap (no torch): `toy_base_path()` and `toy_flux_base_path()` only point at the
committed diffusers folders, which load with `StableDiffusionPipeline.from_pretrained(toy_base_path())`
and `FluxPipeline.from_pretrained(toy_flux_base_path())` like any real base.
"""

from __future__ import annotations

import pathlib

#: model.base names of the shipped toy bases; toy-flux-turbo is toy-flux distilled to 4 steps without CFG
TOY_BASES = {"toy": "base", "toy-flux": "base_flux", "toy-flux-turbo": "base_flux_turbo", "toy-video": "base_video"}
#: model.training_adapter names of the shipped toy adapters: toy-flux-turbo's de-distillation LoRA
TOY_ADAPTERS = {"toy-flux-turbo-adapter": "base_flux_turbo/training_adapter"}


def toy_path(name: str) -> pathlib.Path | None:
    """The folder of a shipped toy base named in `model.base` ('toy', 'toy-flux', 'toy-video'); None otherwise."""
    sub = TOY_BASES.get(name)
    return pathlib.Path(__file__).resolve().parent / sub if sub else None


def toy_adapter_path(name: str) -> pathlib.Path | None:
    """The folder of a shipped toy training adapter named in `model.training_adapter`; None for other values."""
    sub = TOY_ADAPTERS.get(name)
    return pathlib.Path(__file__).resolve().parent / sub if sub else None


def toy_base_path() -> pathlib.Path:
    """Folder of the committed toy base model (standard diffusers layout, safetensors only)."""
    return toy_path("toy")


def toy_flux_base_path() -> pathlib.Path:
    """Folder of the committed FLUX-shaped toy base (FluxPipeline layout, safetensors only)."""
    return toy_path("toy-flux")
