"""The recipe form, generated from the typed recipe schema (finetune/recipe.py and the sections).

`form_spec()` walks the pydantic models and describes each field for the browser: its kind (group, union,
list of unions, bool, int, float, str, choice, multi, lines, numbers, value), default, whether null is allowed
and its help text (the schema's own description). Nothing here knows a key by name: a new field, section,
method or source type shows up in the form by itself.

`path_slots(data)` finds, the same way, every field of a recipe that names a file or folder (those the schema
types with a `PathRef`, finetune/sections.py), so the studio confines each of them without a list of keys.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from finetune.sections import PathRef

_UNIONS = (typing.Union, types.UnionType)


def _json_default(info: FieldInfo) -> Any:
    if info.default_factory is not None:
        value = info.default_factory()
    elif info.default is PydanticUndefined:
        return None
    else:
        value = info.default
    if isinstance(value, BaseModel):
        return None  # a nested section: its own fields carry their defaults
    return json.loads(json.dumps(value, default=str))


def _split_optional(tp: Any) -> tuple[Any, bool]:
    """(the type without None and without Annotated marks such as a PathRef, whether None is allowed)."""
    if typing.get_origin(tp) in _UNIONS:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(tp))
        if len(args) == 1:
            return _plain(args[0]), nullable
        return typing.Union[tuple(args)], nullable  # noqa: UP007
    return _plain(tp), False


def _plain(tp: Any) -> Any:
    """The type inside a plain Annotated mark; a discriminated union keeps its Annotated (it carries the tag)."""
    if typing.get_origin(tp) is typing.Annotated and _discriminated(tp, None) is None:
        return typing.get_args(tp)[0]
    return tp


def _discriminated(tp: Any, info: FieldInfo | None) -> tuple[list[type[BaseModel]], str] | None:
    """The member models and tag key of a discriminated union, else None."""
    disc = info.discriminator if info is not None else None
    if typing.get_origin(tp) is typing.Annotated:
        inner, *meta = typing.get_args(tp)
        disc = next((m.discriminator for m in meta if isinstance(m, FieldInfo) and m.discriminator), disc)
        tp = inner
    if not disc or typing.get_origin(tp) not in _UNIONS:
        return None
    return list(typing.get_args(tp)), str(disc)


def _union_spec(models: list[type[BaseModel]], tag: str) -> dict[str, Any]:
    options = {}
    for m in models:
        value = m.model_fields[tag].default
        options[value] = [s for s in model_spec(m) if s["key"] != tag]
    return {"kind": "union", "tag": tag, "options": options}


def _scalar_kind(tp: Any) -> dict[str, Any]:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return {"kind": "choice", "choices": list(typing.get_args(tp))}
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1]
        if typing.get_origin(item) is Literal:
            return {"kind": "multi", "choices": list(typing.get_args(item))}
        if item is int:
            return {"kind": "numbers"}
        if item is str:
            return {"kind": "lines"}
    if tp is bool:
        return {"kind": "bool"}
    if tp is int:
        return {"kind": "int"}
    if tp is float:
        return {"kind": "float"}
    if tp is str:
        return {"kind": "str"}
    # anything else (a preset name or a list, ...): typed as text, read as JSON, a comma list or a string
    return {"kind": "value"}


def _bounds(info: FieldInfo) -> dict[str, Any]:
    out = {}
    for meta in info.metadata:
        for attr in ("ge", "gt", "le", "lt"):
            if getattr(meta, attr, None) is not None:
                out[attr] = getattr(meta, attr)
    return out


def field_spec(name: str, info: FieldInfo) -> dict[str, Any]:
    union = _discriminated(info.annotation, info)
    tp, nullable = _split_optional(info.annotation)
    base = {"key": name, "help": info.description or "", "nullable": nullable, "required": info.is_required()}
    if union is not None:
        return base | _union_spec(*union)
    if typing.get_origin(tp) in (list, tuple):
        item_union = _discriminated(typing.get_args(tp)[0], None)
        if item_union is not None:
            return base | {"kind": "list", "item": _union_spec(*item_union), "default": _json_default(info)}
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return base | {"kind": "group", "fields": model_spec(tp)}
    return base | _scalar_kind(tp) | {"default": _json_default(info)} | _bounds(info)


def model_spec(model: type[BaseModel]) -> list[dict[str, Any]]:
    return [field_spec(name, info) for name, info in model.model_fields.items()]


def form_spec() -> list[dict[str, Any]]:
    """The whole recipe form, one group per section in the schema's order."""
    from finetune.recipe import Recipe

    return model_spec(Recipe)


def spec_paths(spec: list[dict[str, Any]], prefix: str = "") -> set[str]:
    """Every dotted key the form can show ('data.sources.*.path' for list items): the keys an error can name."""
    out: set[str] = set()
    for s in spec:
        key = prefix + s["key"]
        out.add(key)
        if s["kind"] == "group":
            out |= spec_paths(s["fields"], key + ".")
        elif s["kind"] in ("union", "list"):
            union = s if s["kind"] == "union" else s["item"]
            sub = key + ".*." if s["kind"] == "list" else key + "."
            out.add(sub + union["tag"])
            for fields in union["options"].values():
                out |= spec_paths(fields, sub)
    return out


# ------------------------------------------------------------------------------------------------ paths
@dataclass
class PathSlot:
    """One path field present in raw recipe data: where it is, its value, how the schema marks it."""

    key: str  # dotted, list items by index: 'data.sources.0.path'
    value: str
    ref: PathRef
    owner: dict | list  # the mapping (or list) holding the value: a source's other fields are its siblings
    name: str | int  # the value's key in `owner`


def path_ref(tp: Any, info: FieldInfo | None = None) -> PathRef | None:
    """The PathRef a field carries (on the field, or inside its Optional/Annotated type), else None."""
    for meta in (info.metadata if info is not None else ()):
        if isinstance(meta, PathRef):
            return meta
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        inner, *meta = typing.get_args(tp)
        return next((m for m in meta if isinstance(m, PathRef)), None) or path_ref(inner)
    if origin in _UNIONS:
        return next((r for r in map(path_ref, typing.get_args(tp)) if r is not None), None)
    return None


def _models(tp: Any, info: FieldInfo | None) -> tuple[list[type[BaseModel]], str | None]:
    """The section models a value of this type can be, and the tag that picks one (discriminated unions)."""
    union = _discriminated(tp, info) or _discriminated(_split_optional(tp)[0], None)
    if union is not None:
        return union
    tp, _ = _split_optional(tp)
    return ([tp], None) if isinstance(tp, type) and issubclass(tp, BaseModel) else ([], None)


def _list_member(tp: Any) -> Any | None:
    """The item type of a union's list member (`str | list[str]`: str), else None."""
    if typing.get_origin(tp) not in _UNIONS:
        return None
    return next((i for i in map(_item_type, typing.get_args(tp)) if i is not None), None)


def _item_type(tp: Any) -> Any | None:
    tp, _ = _split_optional(tp)
    return typing.get_args(tp)[0] if typing.get_origin(tp) in (list, tuple) else None


def path_slots(data: Any) -> list[PathSlot]:
    """Every path field present in a recipe as the browser sent it (unvalidated), found through the schema:
    nested sections, list items and the union member each item's tag picks included."""
    from finetune.recipe import Recipe

    return list(_model_slots(Recipe, data, ""))


def _model_slots(model: type[BaseModel], node: Any, prefix: str):
    if not isinstance(node, dict):
        return
    for name, info in model.model_fields.items():
        if name in node:
            yield from _value_slots(info.annotation, info, node, name, prefix + name)


def _value_slots(tp: Any, info: FieldInfo | None, owner, name, key: str):
    value = owner[name]
    ref = path_ref(tp, info)
    if ref is not None and isinstance(value, str):
        yield PathSlot(key, value, ref, owner, name)
        return
    item = _item_type(tp) or _list_member(tp)  # a path or a list of paths (validation.images' items)
    if ref is not None and not (item is not None and isinstance(value, list)):
        return
    if item is not None and isinstance(value, list):
        for i in range(len(value)):
            yield from _value_slots(item, None, value, i, f"{key}.{i}")
        return
    models, tag = _models(tp, info)
    if tag is not None and isinstance(value, dict):
        models = [m for m in models if m.model_fields[tag].default == value.get(tag)]
    if len(models) == 1:
        yield from _model_slots(models[0], value, key + ".")


ITEM = "*"  # a step into a list item (see schema_path_fields)


def schema_path_fields(model: type[BaseModel] | None = None) -> list[tuple[str, PathRef, tuple]]:
    """(dotted key with '*' for list items, its PathRef, the steps that reach it) for every path field the
    schema holds, every union member included. A step is a field name, ITEM, or (tag, value) choosing a union
    member: what a test needs to place a value there."""
    if model is None:
        from finetune.recipe import Recipe

        model = Recipe
    out: list[tuple[str, PathRef, tuple]] = []
    _schema_fields(model, "", (), out)
    return out


def _schema_fields(model: type[BaseModel], prefix: str, steps: tuple, out: list) -> None:
    for name, info in model.model_fields.items():
        _schema_type(info.annotation, info, prefix + name, steps + (name,), out)


def _schema_type(tp: Any, info: FieldInfo | None, key: str, steps: tuple, out: list) -> None:
    ref = path_ref(tp, info)
    if ref is not None:
        out.append((key, ref, steps))
        return
    item = _item_type(tp)
    if item is not None:
        return _schema_type(item, None, key + ".*", steps + (ITEM,), out)
    models, tag = _models(tp, info)
    for m in models:
        choice = ((tag, m.model_fields[tag].default),) if tag is not None else ()
        _schema_fields(m, key + ".", steps + choice, out)
