"""Recipes in the studio: start from a shipped recipe, validate what the form holds, confine its paths.

Reading YAML stays in finetune/recipe.py (the one reader, with its size and depth limits); validation is
`finetune.recipe.validate`, so the form shows the CLI's own messages. This module splits those messages by key
for the form and adds one rule the CLI does not need: every path field of a recipe built in the browser (each
field the schema types as a path, wherever it sits) lies inside the root, and the recipe a run launches holds
those paths absolute, so it means the same from the run's own working folder.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from finetune.errors import RecipeError, UserError
from finetune.recipe import _load_chain, _read_yaml, validate
from finetune.studio.paths import (
    PathError,
    confine,
    inside,
    refuse_links_out,
    relative,
    relative_parts,
    short,
)
from finetune.studio.schema import path_slots

SOURCE_NAME = "recipe.yaml"  # how messages name the form's recipe, as the CLI names a file


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
    """The accelerate configs a run may name: the files of recipes/accelerate/, by name (never a path)."""
    folder = recipes_dir / "accelerate"
    return sorted(p.name for p in folder.glob("*.yaml") if p.is_file()) if folder.is_dir() else []


def accelerate_config(recipes_dir: Path, name: Any) -> Path | None:
    """The config file for a run's `accelerate_config` ('' for one process), chosen from the shipped list."""
    if name in ("", None):
        return None
    choices = accelerate_configs(recipes_dir)
    if not isinstance(name, str) or name not in choices:
        raise UserError(f"accelerate_config: choose one of {', '.join(choices) or 'none (none ship)'}, or '' for "
                        "one process")
    return recipes_dir / "accelerate" / name


def read_launched(path: Path, root: Path) -> dict[str, Any]:
    """A run's recipe.yaml, read with the CLI's limits (size, depth, aliases), as the form shows it."""
    try:
        return shown(_read_yaml(path), root)
    except RecipeError as e:
        raise UserError(short(root, str(e)).splitlines()[0]) from None


def to_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _validate(data: dict[str, Any]) -> tuple[Any, list[dict[str, str]]]:
    """(the Recipe, []) or (None, the CLI's messages, each with the dotted key it names, '' when none)."""
    try:
        return validate(copy.deepcopy(data), Path(SOURCE_NAME)), []
    except RecipeError as e:
        return None, [_split(line) for line in str(e).splitlines() if line.strip()]


def _split(line: str) -> dict[str, str]:
    text = line.removeprefix(f"{SOURCE_NAME}: ")
    key, sep, _ = text.partition(": ")
    looks_like_key = sep and key and " " not in key and all(part for part in key.split("."))
    return {"key": key if looks_like_key else "", "message": line}


# ------------------------------------------------------------------------------------------------ paths
REFUSED = ".studio/refused"  # what a refused path becomes while the rest of the recipe is validated: no read


@dataclass
class Checked:
    """A recipe from the browser, checked: the CLI's messages and the root's path rules, by key."""

    data: dict[str, Any]  # as sent, paths relative to the root: what the form shows
    launch: dict[str, Any]  # every local path absolute under the root: what runs launch and checks read
    errors: list[dict[str, str]]

    @property
    def yaml(self) -> str:
        return to_yaml(self.data)


def check_recipe(data: Any, root: Path) -> Checked:
    """Confine every path field of the recipe (found through the schema, see schema.path_slots) to the root,
    then validate the confined copy as the CLI would. A refused path is validated as a placeholder that reads
    nothing, so the other keys still get their messages, and only the path rule speaks for that key."""
    if not isinstance(data, dict):
        raise UserError("data: the recipe must be a mapping of sections")
    launch, path_errors, refused = _confine(data, root)
    probe = copy.deepcopy(launch)
    for slot in path_slots(probe):
        if slot.key in refused:
            slot.owner[slot.name] = str(root / REFUSED)
    recipe, messages = _validate(probe)
    errors = [e | {"message": short(root, e["message"])} for e in messages if e["key"] not in refused]
    if recipe is not None and not path_errors:
        _pin_defaults(launch, recipe.resolved(), root)
    return Checked(data, launch, errors + path_errors)


def _pin_defaults(launch: dict[str, Any], resolved: dict[str, Any], root: Path) -> None:
    """Write into the launched recipe, absolute, every local path the recipe left to its default
    (train.output_dir: output/run): a run starts in its own folder, where the default would land otherwise."""
    given = {slot.key for slot in path_slots(launch)}
    for slot in path_slots(resolved):
        if slot.key in given or slot.ref.within != "cwd":
            continue
        target = _local(root, slot)
        if target is None:
            continue
        refuse_links_out(root, target, slot.key, "the run")
        node: Any = launch
        *parents, last = slot.key.split(".")
        for part in parents:
            if isinstance(node, list):
                node = node[int(part)]
            else:
                if not isinstance(node.get(part), dict | list):
                    node[part] = {}
                node = node[part]
        node[last] = str(target)


def _confine(data: dict[str, Any], root: Path) -> tuple[dict[str, Any], list[dict[str, str]], set[str]]:
    out = copy.deepcopy(data)
    errors: list[dict[str, str]] = []
    folders: list[Path] = []  # every folder the recipe names, for paths relative to each image's folder
    later = []
    for slot in path_slots(out):
        if slot.ref.within != "cwd":
            later.append(slot)
            continue
        try:
            target = _local(root, slot)
            if target is None:
                continue
            slot.owner[slot.name] = str(target)
            folders += [target] if target.is_dir() else []
            refuse_links_out(root, target, slot.key, "the run")
        except PathError as e:
            errors.append({"key": slot.key, "message": str(e)})
    for slot in later:  # a source's file (beside its folder), a folder beside every image
        try:
            parts = relative_parts(slot.value, slot.key)
            bases = [Path(slot.owner.get("path", ""))] if slot.ref.within == "source" else folders
            for base in (b for b in bases if b.is_absolute() and b.is_dir()):
                confine(base, "/".join(parts), slot.key)
        except PathError as e:
            errors.append({"key": slot.key, "message": str(e)})
    return out, errors, {e["key"] for e in errors}


def _local(root: Path, slot) -> Path | None:
    """The confined folder or file a path field names, or None when its value names no local path."""
    value = slot.value
    if value in slot.ref.names or (isinstance(value, str) and value.startswith(slot.ref.prefixes)) \
            or (slot.ref.hub and not _looks_local(root, value)):
        return None
    return confine(root, value, slot.key)


def _looks_local(root: Path, value: str) -> bool:
    """A hub id ('org/name') is not a local path unless such a folder exists under the root."""
    if value.startswith((".", "/", "~", "\\")) or ":" in value[:3]:
        return True
    return os.path.lexists(root / value) or value.count("/") != 1


def shown(launch: dict[str, Any], root: Path) -> dict[str, Any]:
    """A launched recipe as the form shows it: every path inside the root relative to it again."""
    out = copy.deepcopy(launch)
    for slot in path_slots(out):
        path = Path(slot.value)
        if path.is_absolute() and inside(root, path):
            slot.owner[slot.name] = relative(root, path) or "."
    return out
