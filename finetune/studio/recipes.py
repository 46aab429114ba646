"""Recipes in the studio: start from a shipped recipe, validate what the form holds, confine its paths.

Reading YAML stays in finetune/recipe.py (the one reader); validation is `finetune.recipe.validate`, so the
form shows the CLI's own messages. This module only splits those messages by key for the form and adds
one rule the CLI does not need: every local path in a recipe built in the browser lies inside the root.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from finetune.errors import RecipeError
from finetune.recipe import _load_chain, validate
from finetune.studio.paths import PathError, confine, links_out

SOURCE_NAME = "recipe.yaml"  # how messages name the form's recipe, as the CLI names a file
HUB_OK = {"model.base", "model.config", "model.vae", "hf"}  # may be a hub id instead of a local path


def shipped_recipes(recipes_dir: Path) -> list[str]:
    """The recipes that ship with the project, relative to recipes/ (accelerate configs left out)."""
    if not recipes_dir.is_dir():
        return []
    names = [p.relative_to(recipes_dir).as_posix() for p in recipes_dir.rglob("*.yaml")]
    return sorted((n for n in names if not n.startswith("accelerate/")), key=lambda n: (n.count("/"), n))


def load_shipped(recipes_dir: Path, name: str) -> dict[str, Any]:
    """A shipped recipe's data with its `extends:` chain merged (what the form edits)."""
    if name not in shipped_recipes(recipes_dir):
        raise PathError(f"recipe: '{name}' is not a shipped recipe; choose one of the list")
    return _load_chain(recipes_dir / name)


def accelerate_configs(recipes_dir: Path) -> list[str]:
    folder = recipes_dir / "accelerate"
    return sorted(p.name for p in folder.glob("*.yaml")) if folder.is_dir() else []


def to_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def validation_errors(data: dict[str, Any]) -> list[dict[str, str]]:
    """The CLI's messages for this recipe, each with the dotted key it names ('' when it names none)."""
    try:
        validate(copy.deepcopy(data), Path(SOURCE_NAME))
    except RecipeError as e:
        return [_split(line) for line in str(e).splitlines() if line.strip()]
    return []


def _split(line: str) -> dict[str, str]:
    text = line.removeprefix(f"{SOURCE_NAME}: ")
    key, sep, _ = text.partition(": ")
    looks_like_key = sep and key and " " not in key and all(part for part in key.split("."))
    return {"key": key if looks_like_key else "", "message": line}


# ------------------------------------------------------------------------------------------------ paths
def _path_fields(data: dict[str, Any]) -> list[tuple[str, Any, bool]]:
    """(dotted key, value, may be a hub id) for every field of the recipe that names a file or folder."""
    model, train = data.get("model") or {}, data.get("train") or {}
    section = data.get("data") or {}
    out = [(f"model.{k}", model.get(k), True) for k in ("base", "config", "vae")]
    out.append(("train.output_dir", train.get("output_dir"), False))
    if train.get("resume") not in (None, "latest"):
        out.append(("train.resume", train.get("resume"), False))
    out.append(("data.cache_dir", section.get("cache_dir"), False))
    if isinstance(section.get("prior"), dict):
        out.append(("data.prior.class_dir", section["prior"].get("class_dir"), False))
    for i, src in enumerate(section.get("sources") or []):
        if isinstance(src, dict):
            out.append((f"data.sources.{i}.path", src.get("path"), src.get("type") == "hf"))
    return [(k, v, hub) for k, v, hub in out if isinstance(v, str) and v.strip()]


def _looks_local(root: Path, value: str) -> bool:
    """A hub id ('org/name') or 'toy' is not a local path unless such a folder exists under the root."""
    if value == "toy":
        return False
    if value.startswith((".", "/", "~", "\\")) or ":" in value[:3]:
        return True
    return os.path.lexists(root / value) or value.count("/") != 1


def confine_recipe(data: dict[str, Any], root: Path) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """(a copy with every local path made absolute under the root, errors for paths that leave it).

    The copy is what in-process checks read; runs get the relative paths and start in the root."""
    out = copy.deepcopy(data)
    errors = []
    for key, value, hub_ok in _path_fields(data):
        if hub_ok and not _looks_local(root, value):
            continue
        try:
            target = confine(root, value, key)
        except PathError as e:
            errors.append({"key": key, "message": str(e)})
            continue
        escaping = links_out(root, target) if target.is_dir() and key.startswith("data.") else []
        if escaping:  # the run would read them
            errors.append({"key": key, "message": f"{key}: {', '.join(escaping)} lead(s) outside the studio root; "
                           "copy the files in, or remove the links"})
        node: Any = out
        *parents, last = key.split(".")
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[last] = str(target)
    name = ((data.get("export") or {}).get("name"))
    if isinstance(name, str) and ("/" in name or "\\" in name or name in (".", "..")):
        errors.append({"key": "export.name", "message": f"export.name: '{name}' is a path; give a plain file stem"})
    return out, errors
