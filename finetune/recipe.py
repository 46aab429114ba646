"""The one reader of recipe YAML.

    recipe = load_recipe("recipes/lora.yaml", ["train.lr=1e-4"])

Reads YAML with the safe loader, follows `extends:` chains, applies dotted `key=value` overrides, then
validates everything with the typed sections. Every failure is a `RecipeError` whose one-line message names
the file and the key path, says what was wrong and what is allowed. Nothing heavy is imported here.
"""

from __future__ import annotations

import copy
import hashlib
import json
import reprlib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, PrivateAttr, ValidationError, model_validator

from finetune.data.config import DataSection
from finetune.errors import RecipeError, did_you_mean
from finetune.methods import registered_methods
from finetune.routes import check_routes
from finetune.sections import (
    ExportSection,
    LoggingSection,
    ModelSection,
    StrictModel,
    TrainSection,
    ValidationSection,
    check_memory_options,
)

SECTIONS = ("model", "data", "method", "train", "validation", "export", "logging")
MAX_EXTENDS_DEPTH = 16

_methods = registered_methods()
MethodSection = typing.Annotated[typing.Union[tuple(_methods.values())], Field(discriminator="name")]  # noqa: UP007


class Recipe(StrictModel):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection
    method: MethodSection
    train: TrainSection = Field(default_factory=TrainSection)
    validation: ValidationSection = Field(default_factory=ValidationSection)
    export: ExportSection = Field(default_factory=ExportSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)

    _path: Path | None = PrivateAttr(None)
    _base: Any = PrivateAttr(None)
    _validation_base: Any = PrivateAttr(None)

    @model_validator(mode="after")
    def _cross_rules(self):
        m, d = self.method, self.data
        self._base = self.model.resolve()  # the one resolution of model.base; everything after takes `base`
        if self._base.family is not None:  # else known once its files are here: `complete_base` checks then
            check_family(self, self._base.family)
        self._validation_base = check_routes(self)  # validation.base resolved; distilled-base rules (routes.py)
        check_memory_options(self)
        if d.cache_text is True and m.trains_text_encoder():
            raise ValueError(
                f"data.cache_text cannot be used with method '{m.name}' training the text encoder: "
                "cached text embeddings would never change; set data.cache_text: false"
            )
        for i, src in enumerate(d.sources):
            rules = d.caption_rules(src)
            if d.cache_text is True and rules.varies:
                raise ValueError(
                    f"data.cache_text with shuffled or dropped captions (data.sources.{i}) would cache one "
                    "variant forever; turn off shuffle_tags/caption_dropout/tag_dropout or data.cache_text"
                )
        if d.preservation is not None:
            _check_preservation(self)
        if d.masks is not None and d.masks.unmasked_target == "base" and not m.switchable_adapters():
            raise ValueError(f"data.masks.unmasked_target: base needs the base's own prediction, which method "
                             f"'{m.name}' cannot give (it trains no switchable adapters); use lora or pivotal, or "
                             "set data.masks.unmasked_target: none")
        m.check_recipe(self)
        best = self.train.keep_best
        missing = [k for k in ([best] if isinstance(best, str) else best or {}) if k not in self.validation.metrics]
        if missing:
            raise ValueError(f"train.keep_best uses {', '.join(missing)}, which validation.metrics does not compute; "
                             f"add {' and '.join(missing)} to validation.metrics")
        if self.export.formats is None:  # every format the method writes, diffusers first
            self.export.formats = sorted(m.export_formats, key=lambda f: (f != "diffusers", f))
        bad = [f for f in self.export.formats if f not in m.export_formats]
        if bad:
            raise ValueError(
                f"export.formats {bad} are not written by method '{m.name}'; it writes {sorted(m.export_formats)}"
            )
        return self

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def base(self):
        """What `model.base` names, resolved once when the recipe validated (a `Base`, finetune/models/base.py):
        the loader, `estimate`, the tools and every family rule take this value."""
        return self._base

    @property
    def validation_base(self):
        """`validation.base` resolved (a `Base`), or None: the grids render with it (finetune/routes.py)."""
        return self._validation_base

    def resolved(self) -> dict[str, Any]:
        """The fully resolved recipe as plain data (what --print shows and runs store)."""
        return self.model_dump(mode="json")

    def fingerprint(self) -> str:
        """A hash of the resolved recipe, for checkpoints to notice a changed recipe."""
        blob = json.dumps(self.resolved(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- reading
class _DuplicateKey(yaml.MarkedYAMLError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """The safe loader, except that a key given twice in one mapping is an error: PyYAML keeps the last
    silently, so a recipe would train with a value its author did not see."""


def check_family(recipe: Recipe, family) -> None:
    """The rules that depend on the base's family: the family's own and the method's (ValueError naming the key).
    They run while the recipe validates when the family is known then, else once the base has loaded."""
    family.check_recipe(recipe)
    recipe.method.check_family(recipe, family)


def complete_base(recipe: Recipe):
    """The recipe's base, ready to load (`Base.complete`: a hub id's configs fetched, a pickle's keys read). Where
    its family shows only now, the family rules that waited for it run now, from the completed value; errors
    as RecipeError."""
    waited = recipe.base.family is None
    recipe._base = recipe.base.complete()
    if waited:
        try:
            check_family(recipe, recipe.base.family)
        except ValueError as e:
            raise RecipeError(f"{recipe.path}: {_one_line(str(e))}" if recipe.path else _one_line(str(e))) from None
    return recipe.base


def _check_preservation(recipe: Recipe) -> None:
    m = recipe.method
    if not m.switchable_adapters():
        raise ValueError(f"data.preservation needs the base's own prediction, which method '{m.name}' cannot give "
                         "(it trains no switchable adapters); use lora or pivotal, or data.prior with class images")
    if recipe.train.batch_size < 2:
        raise ValueError("data.preservation shares each batch between instance and preservation examples: set "
                         "train.batch_size to 2 or more")


def _unique_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    first: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            seen = first.get(key)
        except TypeError:  # an unhashable key: the safe constructor reports it properly below
            continue
        if seen is not None:
            raise _DuplicateKey(problem=f"key '{key}' is given twice in one mapping (first on line {seen}); "
                                        "keep one", problem_mark=key_node.start_mark)
        first[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


MAX_DEPTH = 50  # a recipe is 4-5 levels deep; deeper is a mistake or an attack on the recursive parser
MAX_NODES = 100_000  # values after aliases expand: a 1 KB "billion laughs" file would otherwise fill memory


def _load_bounded(text: str, path: Path) -> Any:
    """yaml.load with our strict loader, refusing documents nested too deeply or too large once aliases
    expand (both checked on the composed node graph, before any Python object is built)."""
    loader = _StrictLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise RecipeError(f"{path}: nested too deeply (more than {MAX_DEPTH} levels); flatten it") from None
        if node is None:
            return None
        _check_size(node, path)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_size(root: yaml.Node, path: Path) -> None:
    count, stack = 0, [(root, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if depth > MAX_DEPTH:
            raise RecipeError(f"{path}: nested too deeply (more than {MAX_DEPTH} levels); flatten it")
        if count > MAX_NODES:
            raise RecipeError(f"{path}: more than {MAX_NODES:,} values once its aliases (*name) are expanded; "
                              "a recipe needs far fewer: remove the repeated aliases")
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend((child, depth + 1) for pair in node.value for child in pair)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise RecipeError(f"{path}: recipe file {what}; pass the path of a .yaml recipe (see recipes/)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not UTF-8 text; save the recipe as UTF-8") from None
    try:
        data = _load_bounded(text, path)
    except _DuplicateKey as e:
        raise RecipeError(f"{path}:{e.problem_mark.line + 1}: {e.problem}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise RecipeError(f"{path}{where}: YAML syntax error: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: YAML error: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections ({', '.join(SECTIONS)}), not a {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; anything else (lists included) is replaced by `over`."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _load_chain(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise RecipeError(f"{path}: 'extends' loops back to itself ({' -> '.join(p.name for p in seen + (path,))})")
    if len(seen) > MAX_EXTENDS_DEPTH:
        raise RecipeError(f"{path}: 'extends' chain is deeper than {MAX_EXTENDS_DEPTH}")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecipeError(f"{path}: 'extends' must be a path to another recipe, not {parent!r}")
    parent_path = (path.parent / parent) if not Path(parent).is_absolute() else Path(parent)
    if not parent_path.is_file():
        raise RecipeError(f"{path}: extends '{parent}', which does not exist (looked at {parent_path})")
    return deep_merge(_load_chain(parent_path, seen + (path,)), data)


# --------------------------------------------------------------------------------------------- overrides
def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=1e-4' -> (['train', 'lr'], 0.0001). The value is read as a YAML scalar or flow list."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override '{text}': expected key.path=value, e.g. train.lr=1e-4")
    try:
        value = yaml.load(raw, Loader=_StrictLoader) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw.strip()
    if isinstance(value, str) and value == raw.strip():  # unquoted text
        try:  # PyYAML reads 1e-4 (no dot) as a string; people type it that way
            value = float(value) if any(c.isdigit() for c in value) and "e" in value.lower() else value
        except ValueError:
            pass
    return key.split("."), value


def override_text(text: str) -> Any:
    """The override's value with every scalar kept as the text written (YAML quoting still applies):
    what a string field gets where YAML would type it (`no` -> 'no', not False; `1.10` -> '1.10')."""
    raw = text.partition("=")[2]
    try:
        return yaml.load(raw, Loader=yaml.BaseLoader) if raw.strip() else ""
    except yaml.YAMLError:
        return raw.strip()


def apply_override(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node: Any = data
    for i, k in enumerate(keys[:-1]):
        where = ".".join(keys[: i + 1])
        if isinstance(node, list):
            node = node[_list_index(node, k, where)]
            continue
        if not isinstance(node, dict):
            raise RecipeError(f"override '{'.'.join(keys)}': '{'.'.join(keys[:i])}' is not a section")
        node = node.setdefault(k, {})
    last = keys[-1]
    if isinstance(node, list):
        node[_list_index(node, last, ".".join(keys))] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise RecipeError(f"override '{'.'.join(keys)}': '{'.'.join(keys[:-1])}' is not a section")


def _list_index(node: list, k: str, where: str) -> int:
    if not k.lstrip("-").isdigit() or not -len(node) <= int(k) < len(node):
        raise RecipeError(f"override '{where}': index must be 0..{len(node) - 1} for a list of {len(node)}")
    return int(k)


# ------------------------------------------------------------------------------------------- validation
def _unwrap(tp: Any) -> Any:
    """Strip Optional/Annotated/list[...] to reach a model class (or a discriminated union)."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if origin in (list, tuple):
        return ("list", _unwrap(typing.get_args(tp)[0]))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        models = [a for a in typing.get_args(tp) if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(models) == 1:
            return models[0]
        lists = [a for a in typing.get_args(tp) if typing.get_origin(a) in (list, tuple)]
        if models:
            return ("union", models)
        if lists:
            return _unwrap(lists[0])
    return tp


def _walk(loc: tuple) -> tuple[list[str], Any]:
    """Follow a pydantic error location through the schema: (display path, model class at the end)."""
    shown: list[str] = []
    node: Any = Recipe
    i = 0
    while i < len(loc):
        part = loc[i]
        if isinstance(node, tuple) and node[0] == "list":
            shown.append(str(part))
            node = node[1]
        elif isinstance(node, tuple) and node[0] == "union":
            # pydantic puts the discriminator's tag in the location: skip it, pick the member
            picked = [m for m in node[1] if _tag_of(m) == part]
            node = picked[0] if picked else None
        elif isinstance(node, type) and issubclass(node, BaseModel) and part in node.model_fields:
            shown.append(str(part))
            node = _unwrap(node.model_fields[part].annotation)
        elif isinstance(node, type) and issubclass(node, BaseModel) and part == _tag_of(node):
            pass  # a one-member discriminated union still carries its tag in the location
        else:
            shown.append(str(part))
            node = None
        i += 1
    return shown, node


def _tag_of(model: type[BaseModel]) -> Any:
    for name in ("type", "name"):
        f = model.model_fields.get(name)
        if f is not None and isinstance(f.default, str):
            return f.default
    return None


def _allowed(err: dict) -> str:
    ctx = err.get("ctx") or {}
    if "expected" in ctx:
        return f"allowed: {ctx['expected']}"
    for key, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("multiple_of", "a multiple of")):
        if key in ctx:
            return f"must be {word} {ctx[key]}"
    return ""


def _short(value: Any, limit: int = 120) -> str:
    """repr(value), cut to `limit` characters: an error line stays one readable line whatever was given."""
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 3, limit, limit
    text = short.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(msg: str) -> str:
    return msg if len(msg) <= 300 else msg[:297] + "..."


def _other_source_hint(parent_cls, loc: tuple, shown: list[str]) -> str:
    """A key another kind of data source has (`path` on a toy source): say how to switch the item's kind, the
    first thing a newcomer tries when pointing a toy recipe at their own pictures."""
    from finetune.data.config import FolderSource, ToySource

    key = loc[-1] if loc else None
    if parent_cls is not ToySource or key not in FolderSource.model_fields:
        return ""
    item = ".".join(shown)
    return (f"; {item} is a toy source (drawn images, no files): for a folder of your own pictures replace the "
            f"whole item, '{item}={{type: folder, path: DIR}}', or start from recipes/toy/my_pictures.yaml "
            f"(python -m finetune recipes/toy/my_pictures.yaml data.sources.0.path=DIR)")


def _describe(err: dict, source: Path | None) -> str:
    loc = tuple(err["loc"])
    kind = err["type"]
    where = f"{source}: " if source else ""
    if kind == "union_tag_invalid":
        shown, _ = _walk(loc)
        tag = (err.get("ctx") or {}).get("tag")
        tag_key = (err.get("ctx") or {}).get("discriminator", "").strip("'")
        options = [t.strip().strip("'") for t in str((err.get("ctx") or {}).get("expected_tags", "")).split(",")]
        key = ".".join(shown + [tag_key])
        return f"{where}{key}: unknown value '{tag}'{did_you_mean(tag, options)}; allowed: {', '.join(options)}"
    if kind == "union_tag_not_found":
        shown, _ = _walk(loc)
        tag_key = (err.get("ctx") or {}).get("discriminator", "").strip("'")
        return f"{where}{'.'.join(shown + [tag_key])}: missing; say which one (e.g. {tag_key}: ...)"
    shown, _ = _walk(loc[:-1]) if loc else ([], Recipe)
    parent_cls = _walk(loc[:-1])[1] if loc else Recipe
    key = ".".join(shown + ([str(loc[-1])] if loc else []))
    if kind == "extra_forbidden":
        options = list(parent_cls.model_fields) if isinstance(parent_cls, type) else []
        hint = did_you_mean(loc[-1], options)
        listing = f"; known keys here: {', '.join(options)}" if options and not hint else ""
        return f"{where}{key}: unknown key{hint}{listing}{_other_source_hint(parent_cls, loc, shown)}"
    if kind == "missing":
        return f"{where}{key}: required key is missing"
    value = err.get("input")
    msg = _one_line(err["msg"].removeprefix("Value error, "))
    allowed = _allowed(err)
    if isinstance(value, dict) or kind == "value_error" and isinstance(parent_cls, type):
        shown_all, _ = _walk(loc)
        return f"{where}{'.'.join(shown_all)}: {msg}" if shown_all else f"{where}{msg}"
    text = f"{where}{key or '(recipe)'}: {_short(value)} is not valid: {msg}" if loc else f"{where}{msg}"
    return text + (f" ({allowed})" if allowed and allowed not in msg else "")


def _written_back(data: dict[str, Any], errors: list[dict], written: dict[str, tuple[list[str], Any]]):
    """`data` where a string field rejected what YAML typed in an override, with the text as written put back
    there (the whole value, or the one list item / mapping entry); None when there is no such place."""
    fixed = None
    for err in errors:
        if err["type"] not in ("string_type", "literal_error") or err.get("input") is None:
            continue  # the field does not want text here, or null was meant as null
        path = _walk(tuple(err["loc"]))[0]
        for keys, text in written.values():
            if path[: len(keys)] != keys:
                continue
            where = list(keys)
            for part in path[len(keys):]:  # down to the rejected item, as far as the value goes
                if isinstance(text, list) and part.isdigit() and int(part) < len(text):
                    text = text[int(part)]
                elif isinstance(text, dict) and part in text:
                    text = text[part]
                else:
                    break
                where.append(part)
            fixed = fixed if fixed is not None else copy.deepcopy(data)
            apply_override(fixed, where, text)
    return fixed


def validate(data: dict[str, Any], source: Path | None = None,
             written: dict[str, tuple[list[str], Any]] | None = None) -> Recipe:
    unknown = [k for k in data if k not in SECTIONS]
    if unknown:
        k = unknown[0]
        raise RecipeError(
            f"{source}: unknown section '{k}'{did_you_mean(k, SECTIONS)}; sections are {', '.join(SECTIONS)}"
        )
    try:
        try:
            recipe = Recipe.model_validate(data)
        except ValidationError as e:
            retry = _written_back(data, e.errors(include_url=False), written or {})
            if retry is None:
                raise
            recipe = Recipe.model_validate(retry)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        lines = [_describe(err, source) for err in errors[:3]]
        more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
        raise RecipeError("\n".join(lines) + more) from None
    recipe._path = source
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, merge, override and validate a recipe file."""
    path = Path(path)
    data = _load_chain(path)
    written: dict[str, tuple[list[str], Any]] = {}  # overrides YAML typed, with their text as written
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(data, keys, value)
        as_text = override_text(text)
        written.pop(".".join(keys), None)
        if as_text != value:
            written[".".join(keys)] = (keys, as_text)
    return validate(data, path, written)


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML text (stored in every run folder)."""
    return yaml.safe_dump(recipe.resolved(), sort_keys=False, allow_unicode=True)
