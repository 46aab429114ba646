"""Confinement by construction: every path field of the recipe schema, found by walking the schema (nested
sections, list items, every union member), is confined to the studio root when a recipe comes through the
studio; and a field that looks like a path but is not typed as one fails the test until it is (or until it is
listed below with the reason it is no path)."""

from __future__ import annotations

import copy
import re

import pytest

from finetune.studio.schema import ITEM, form_spec, schema_path_fields
from tests.studio_helpers import W, client, png, world  # noqa: F401  (fixture)

# string fields whose name or help mentions a file, folder or model but which name none on disk
NOT_PATHS = {
    "data.sources.*.name": "a label in summaries",
    "data.sources.*.caption_ext": "a suffix joined to each image's own stem inside its source folder",
    "export.name": "a file stem: the schema refuses separators, a leading '.' or '~'",
    "method.blocks": "module paths inside the model, not files",
    "method.lora.blocks": "module paths inside the model, not files",
    "train.compile": "true / false / 'blocks', a choice (its help text mentions what compiles)",
    "data.conditioning.column": "a column name of the metadata table (its help text mentions paths in it)",
    "data.conditioning.folder": "a sub-folder name inside each folder source: the schema refuses separators, a "
    "leading '.' or '~'",
    "data.conditioning.target_folder": "a sub-folder name inside each folder source, as data.conditioning.folder",
}
LOOKS_LIKE_A_PATH = re.compile(r"folder|file|path|director|checkpoint|hub id|_dir$|_model$|^config$|^vae$", re.I)
FIELDS = schema_path_fields()


def _leaves(spec, prefix=""):
    """(dotted key, help) of every text-valued field the form shows."""
    for s in spec:
        key = prefix + s["key"]
        if s["kind"] == "group":
            yield from _leaves(s["fields"], key + ".")
        elif s["kind"] in ("union", "list"):
            union = s if s["kind"] == "union" else s["item"]
            for fields in union["options"].values():
                yield from _leaves(fields, key + (".*." if s["kind"] == "list" else "."))
        elif s["kind"] in ("str", "value", "lines"):
            yield key, s["help"]


def test_every_field_that_looks_like_a_path_is_typed_as_one():
    typed = {key.removesuffix(".*") for key, _, _ in FIELDS}  # a list of paths is typed by its items
    assert {"train.output_dir", "data.masks.folder", "validation.reference_dir", "validation.clip_model",
            "validation.dino_model", "data.sources.*.path", "data.sources.*.file", "model.base"} <= typed
    suspects = {key for key, text in _leaves(form_spec())
                if LOOKS_LIKE_A_PATH.search(key.rsplit(".", 1)[-1]) or LOOKS_LIKE_A_PATH.search(text)}
    untyped = sorted(suspects - typed - set(NOT_PATHS))
    assert not untyped, f"type these as paths (finetune.sections.LocalPath / PathRef) or list them in NOT_PATHS: {untyped}"
    assert not set(NOT_PATHS) - suspects, "NOT_PATHS names fields that no longer exist or no longer look like paths"


def _place(steps: tuple, value) -> dict:
    """The smallest raw recipe fragment holding `value` at the schema position `steps`."""
    node = value
    for step in reversed(steps):
        if step == ITEM:
            node = [node]
        elif isinstance(step, tuple):
            node[step[0]] = step[1]
        else:
            node = {step: node}
    return node


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _bad_values(ref, outside) -> list[str]:
    if ref.within == "source":  # relative to the source's own folder (sets/ below, holding the link 'out')
        return [str(outside / "meta.jsonl"), "../meta.jsonl", "out/meta.jsonl"]
    if ref.within == "image":  # relative to each image's own folder (sets/)
        return [str(outside), "../../outside", "out"]
    # ... and data/, a folder inside the root holding links out of it (a run would read through them)
    return [str(outside), "../outside", "escape", "data/../../outside", "escape/secret.png", "data"]


@pytest.mark.parametrize("field", FIELDS, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(FIELDS)])
def test_every_path_field_of_the_schema_is_confined(world, field):  # noqa: F811
    root, outside = world
    key, ref, steps = field
    concrete = key.replace("*", "0")
    c, studio = client(root)
    png(root / "sets" / "0.png")
    (root / "sets" / "out").symlink_to(outside, target_is_directory=True)
    base = c.get("/api/recipes/toy/lora.yaml").json()
    for bad in _bad_values(ref, outside):
        fragment = _place(steps, bad)
        if ref.within == "source":
            fragment["data"]["sources"][0]["path"] = "sets"
        if ref.within == "image":
            fragment["data"]["sources"] = [{"type": "folder", "path": "sets"}]
        data = _merge(base, fragment)
        errors = c.post("/api/recipe/validate", json={"data": data}, headers=W).json()["errors"]
        assert concrete in {e["key"] for e in errors}, (bad, errors)
        r = c.post("/api/runs", json={"data": data}, headers=W)
        assert r.status_code == 422 and concrete in {e["key"] for e in r.json()["errors"]}, (bad, r.text)
    assert studio.runs.list() == []


@pytest.mark.parametrize("field", [f for f in FIELDS if f[1].within == "cwd"], ids=lambda f: f[0])
def test_a_path_field_inside_the_root_is_launched_absolute(world, field):  # noqa: F811
    from finetune.studio.recipes import check_recipe
    from finetune.studio.schema import path_slots

    root, _ = world
    key, ref, steps = field
    (root / "sets" / "inner").mkdir(parents=True)
    checked = check_recipe(_place(steps, "sets/inner"), root)
    slots = {s.key: s.value for s in path_slots(checked.launch)}
    assert slots[key.replace("*", "0")] == str(root / "sets" / "inner")
    assert key.replace("*", "0") not in {e["key"] for e in checked.errors}
    # built-in names ('latest', 'toy') and prefixed ones ('toy:red circle') are no paths and pass as they are
    for name in [*ref.names, *(p + "red circle" for p in ref.prefixes)]:
        checked = check_recipe(_place(steps, name), root)
        assert {s.key: s.value for s in path_slots(checked.launch)}[key.replace("*", "0")] == name


def test_a_list_of_paths_inside_a_list_is_confined_item_by_item(world):  # noqa: F811
    """validation.images takes a path or a list of paths per prompt (several references): every path in the
    inner lists is confined too, and 'toy:' drawings pass as they are."""
    from finetune.studio.recipes import check_recipe

    root, outside = world
    data = {"validation": {"prompts": ["make it red"], "images": [["../outside.png", "toy:red circle", str(outside)]]}}
    keys = {e["key"] for e in check_recipe(data, root).errors}
    assert {"validation.images.0.0", "validation.images.0.2"} <= keys and "validation.images.0.1" not in keys
