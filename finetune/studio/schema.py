"""The recipe form, generated from the typed recipe schema (finetune/recipe.py and the sections).

`form_spec()` walks the pydantic models and describes each field for the browser: its kind (group, union,
list of unions, bool, int, float, str, choice, multi, lines, numbers, value), default, whether null is allowed
and its help text (the schema's own description). Nothing here knows a key by name: a new field, section,
method or source type shows up in the form by itself.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

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
    """(the type without None, whether None is allowed)."""
    if typing.get_origin(tp) in _UNIONS:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(tp))
        if len(args) == 1:
            return args[0], nullable
        return typing.Union[tuple(args)], nullable  # noqa: UP007
    return tp, False


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
