"""Recipe rules for distilled bases: where a run trains, where its grids sample, and what the export is for.

A LoRA trained directly on a step-distilled base (FLUX.1 [schnell], Z-Image-Turbo, FLUX.2 [klein] 4B / 9B) tends to
lose the base's few steps: the flow-matching loss pulls it back toward an undistilled model (grey or generic images
at the distilled steps; docs/toy.md shows it on the toy). Two routes work, and a recipe that takes neither is warned:

1. train on the undistilled base, sample on the distilled one: `model.base` trains, `validation.base` renders the
   grids with the trained adapters at its own steps and guidance, `export.target_base` (default validation.base)
   is what the card and metadata say the export is for;
2. train on the distilled base through a de-distillation LoRA applied while training (`model.training_adapter`),
   which is never trained and never exported.

Pure Python: resolving `validation.base` reads configs only (finetune/models/base.py), like `model.base`.
"""

from __future__ import annotations

from pathlib import Path

from finetune.models.base import Base, resolve_base


def check_routes(recipe) -> Base | None:
    """The recipe's rules for validation.base, export.target_base and model.training_adapter (ValueError naming
    the key); returns validation.base resolved (None when unset)."""
    v, m = recipe.validation, recipe.method
    if v.training_adapter != "off" and recipe.model.training_adapter is None:
        raise ValueError(f"validation.training_adapter: {v.training_adapter} shows grids with model.training_adapter, "
                         "which is not set; set it, or remove validation.training_adapter")
    if v.base is None:
        return None
    if "denoiser" in m.trains_in_place():
        raise ValueError(f"validation.base renders the grids with the trained adapters applied to another base; "
                         f"method '{m.name}' trains the denoiser's own weights: remove validation.base")
    target = resolve_base(v.base)
    problem = family_mismatch("validation.base", target, recipe.base)
    if problem:
        raise ValueError(problem)
    return target


def family_mismatch(key: str, other: Base, base: Base | None) -> str | None:
    """Why `other` cannot take adapters trained on `base`, when both families are known and differ."""
    family = base.family if base is not None else None
    if other.family is None or family is None or other.family is family:
        return None
    return (f"{key} '{other.name}' is a {other.family.name} base and model.base a {family.name} one: adapters move "
            "only between bases of one family")


def complete_other(recipe, base: Base, key: str) -> Base:
    """A second base of the recipe (validation.base) ready to load, and of model.base's family (ModelError)."""
    from finetune.errors import ModelError

    base = base.complete()
    problem = family_mismatch(key, base, recipe.base)
    if problem:
        raise ModelError(problem)
    return base


def is_hub_reference(value: str) -> bool:
    """'org/name' or 'org/name/file.safetensors' that is not a path on this machine."""
    parts = value.split("/")
    return (not value.startswith((".", "/", "~")) and len(parts) >= 2 and all(parts)
            and not Path(value).expanduser().exists())


def check_adapter_value(value: str) -> None:
    """A local path that is not there fails now; a hub reference is fetched when the run starts."""
    from finetune.toy import toy_adapter_path

    if toy_adapter_path(value) is not None or Path(value).expanduser().exists() or is_hub_reference(value):
        return
    raise ValueError(f"'{value}': no such file or folder (nor a hub reference 'org/name' or 'org/name/file')")


def target_base(recipe) -> str:
    """What the export is for: export.target_base, else validation.base, else model.base (as written)."""
    return recipe.export.target_base or recipe.validation.base or recipe.model.base


def recipe_warnings(recipe) -> list[str]:
    """One line per thing the user should know before a run starts (printed by the trainer and --check)."""
    line = distilled_warning(recipe)
    return [line] if line else []


def distilled_warning(recipe) -> str | None:
    """A LoRA (or any weights of the denoiser) trained directly on a step-distilled base, neither route taken."""
    base = recipe.base
    s = base.sampling if base is not None else None
    m = recipe.method
    trains_denoiser = m.switchable_adapters() or "denoiser" in m.trains_in_place()
    if s is None or not s.step_distilled or not trains_denoiser or recipe.model.training_adapter is not None:
        return None
    return (f"model.base '{base.name}' is step-distilled ({s.what}: {s.steps} steps, no CFG); trained on directly, "
            f"a {m.name} tends to lose those steps (grey or generic images). Two routes keep them: train on the "
            f"undistilled base and set validation.base: {base.name}, or train here through a de-distillation LoRA "
            "(model.training_adapter). See docs/distilled.md")
