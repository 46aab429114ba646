"""Adapter kinds: one object per kind of LoRA-family adapter, registered by name (as peft registers its tuners).

A kind holds everything that differs between LoRA, LoHa, LoKr, ...: the peft config that trains it, its tensor
names in peft files and in kohya/LyCORIS files, how its rank shows in its tensors, and the weight change its
tensors make. Readers, writers, fusing, merging and the `lora` method ask the kind; none of them branches on a
kind's name. Adding a kind (OFT, BOFT, IA3, ...) is one module that subclasses `AdapterKind`
(finetune/kinds/base.py) plus one entry in `BUILT_IN` below; `register_kind` adds one at run time (a test's
toy kind).

Nothing heavy at import time: recipes check `method.adapter` against this registry before torch is loaded.
"""

from __future__ import annotations

from finetune.errors import ModelError, did_you_mean
from finetune.kinds.base import AdapterKind
from finetune.kinds.loha import LoHa
from finetune.kinds.lokr import LoKr
from finetune.kinds.lora import LoRA

__all__ = ["AdapterKind", "get_kind", "kind_of_kohya", "kind_of_peft", "kohya_spellings", "peft_spellings",
           "register_kind", "registered_kinds", "unregister_kind"]

#: the kinds that ship, registered in this order (ties between tensor spellings resolve in it)
BUILT_IN: tuple[type[AdapterKind], ...] = (LoHa, LoKr, LoRA)

_KINDS: dict[str, AdapterKind] = {}


def register_kind(kind: type[AdapterKind] | AdapterKind) -> type[AdapterKind] | AdapterKind:
    """Register a kind (a class or an instance; usable as a class decorator). Names and tensor names must be
    new: two kinds that claim one tensor name could not be told apart in a file."""
    obj = kind() if isinstance(kind, type) else kind
    if not obj.name:
        raise ValueError(f"{type(obj).__name__} needs a name")
    if obj.name in _KINDS:
        raise ValueError(f"adapter kind {obj.name!r} is registered twice")
    mine = set(obj.kohya_names) | set(obj.kohya_names.values()) | set(obj.aliases)
    for other in _KINDS.values():
        theirs = set(other.kohya_names) | set(other.kohya_names.values()) | set(other.aliases)
        if mine & theirs:
            raise ValueError(f"adapter kind {obj.name!r} claims tensor names of {other.name!r}: {sorted(mine & theirs)}")
    _KINDS[obj.name] = obj
    return kind


def unregister_kind(name: str) -> None:
    """Remove a kind (tests that register a toy kind clean up with this)."""
    _KINDS.pop(name, None)


def registered_kinds() -> dict[str, AdapterKind]:
    return dict(_KINDS)


def get_kind(name: str) -> AdapterKind:
    if name not in _KINDS:
        raise ModelError(f"unknown adapter kind '{name}'{did_you_mean(name, _KINDS)}; known: {sorted(_KINDS)}")
    return _KINDS[name]


def peft_spellings() -> dict[str, str]:
    """Every way a peft-format file spells a tensor after the module path -> the peft name (longest first)."""
    names = {n: n for k in _KINDS.values() for n in k.kohya_names}
    names |= {a: n for k in _KINDS.values() for a, n in k.aliases.items()}
    return dict(sorted(names.items(), key=lambda kv: -len(kv[0])))


def kohya_spellings() -> set[str]:
    return {n for k in _KINDS.values() for n in k.kohya_names.values()}


def kind_of_peft(names, where: str) -> AdapterKind:
    """The one kind whose peft tensor names these are."""
    return _one({k.name for k in _KINDS.values() for n in names if n in k.kohya_names}, names, where)


def kind_of_kohya(names, where: str) -> AdapterKind:
    """The one kind whose kohya/LyCORIS tensor names these are."""
    return _one({k.name for k in _KINDS.values() for n in names if n in k.kohya_names.values()}, names, where)


def _one(found: set[str], names, where: str) -> AdapterKind:
    if len(found) == 1:
        return _KINDS[found.pop()]
    if not found:
        raise ModelError(f"{where}: tensors {sorted(names)} are no adapter kind we know ({sorted(_KINDS)})")
    raise ModelError(f"{where}: tensors {sorted(names)} mix adapter kinds {sorted(found)}")


for _kind in BUILT_IN:
    register_kind(_kind)
