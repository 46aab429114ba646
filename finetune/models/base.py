"""What `model.base` names, resolved once into a value: where the weights are, in which form, which family.

    base = resolve_base("black-forest-labs/FLUX.1-dev")  # or a diffusers folder, a single file, 'toy'
    base.form, base.location, base.family               # 'hub', the id, FLUX (None until its configs are here)

A recipe resolves its base once (`Recipe.base`) and passes the value to everything that needs it: the recipe
rules that depend on the family, the loader (finetune/models/components.py), `finetune estimate`, the tools.
Resolving reads no weights and imports no torch: a folder's family comes from its config files, a .safetensors
file's from its header. What cannot be known yet leaves `family` None: a hub id not in the local cache, or a
pickle checkpoint (its keys are read only once it is to be loaded, with `model.allow_pickle`). Before loading,
`complete()` fills it in: it fetches the hub id's configs into the cache, or reads the pickle's keys; the
recipe's family rules then run from the completed value (`finetune.recipe.complete_base`).

A base that cannot load (no such path, a folder without model_index.json, configs no family recognises, a
pickle not allowed) still resolves, with `problem` saying why; `complete()` and the loader raise it. So
`--print`, `--check` and the studio work on a recipe written for another machine, and the error comes where it
always did: when the base is about to load.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from finetune.errors import ModelError
from finetune.models.detect import describe
from finetune.models.families import FAMILIES
from finetune.models.family import Family
from finetune.models.sampling import Sampling, sampling_of

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SINGLE_FILE_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
CONFIG_FILES = ["model_index.json", "*/config.json", "scheduler/*.json"]  # what detection reads, not weights


@dataclass(frozen=True)
class Base:
    """A base model, described without loading it. `form` is 'toy' (a shipped toy base), 'folder' (a local
    diffusers folder), 'file' (a single-file checkpoint) or 'hub' (a hub id, cached here or not)."""

    name: str  # model.base as written
    form: str
    location: str  # what the loader opens: the folder, the file or the hub id
    #: None while it cannot be known: a hub id not in the local cache, a pickle checkpoint (see `complete`)
    family: Family | None = None
    forced: bool = False  # the family was named (model.family), not detected
    #: a diffusers folder on this machine holding the base's configs (toy, folder, a cached hub id's snapshot)
    folder: Path | None = None
    index: Mapping[str, Any] = field(default_factory=dict)  # that folder's model_index.json
    revision: str | None = None
    config: str | None = None  # a single file's diffusers configs (model.config): a folder or a hub id
    allow_pickle: bool = False
    problem: str | None = None  # why it cannot load: `check` and `complete` raise it

    def __deepcopy__(self, memo) -> Base:
        return self  # a value: a copied recipe shares it (and its family stays the registered object)

    @property
    def local(self) -> bool:
        """The weights are a folder on this machine (a shipped toy base or a diffusers folder)."""
        return self.form in ("toy", "folder")

    @property
    def sampling(self) -> Sampling | None:
        """How this base is meant to be sampled and whether it was distilled (finetune/models/sampling.py), from
        its family, configs and name; None while its family is unknown."""
        if self.family is None:
            return None
        return sampling_of(self.family, self.folder, self.index, self.name)

    def check(self) -> None:
        """Raise the reason this base cannot load, if there is one."""
        if self.problem:
            raise ModelError(self.problem)

    def known_as(self, family: Family) -> Base:
        """This base, its family known."""
        return replace(self, family=family)

    def complete(self) -> Base:
        """This base ready to load, its family known: a hub id's configs fetched into the local cache when they
        are not there yet (configs only: the loader fetches the weights), a pickle checkpoint's keys read (it
        was allowed). Raises why it cannot load."""
        self.check()
        if self.family is not None:
            return self
        if self.form == "file":
            return self.known_as(describe(self.location, self.allow_pickle)[1])
        folder = cached_folder(self.location, self.revision) or self._fetch_configs()
        index, family = describe(folder)
        return replace(self, family=family, folder=folder, index=index)

    def _fetch_configs(self) -> Path:
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(self.location, revision=self.revision, allow_patterns=CONFIG_FILES))
        except Exception as e:  # noqa: BLE001 - offline, unknown id, gated, no network: huggingface_hub's own errors
            raise ModelError(load_failure(self.name, "hub", e)) from None


def resolve_base(name: str, revision: str | None = None, family: str = "auto", *, config: str | None = None,
                 allow_pickle: bool = False) -> Base:
    """The one resolver: `model.base` (+ its revision, and `model.family` when it names one) as a `Base`."""
    if family != "auto" and family not in FAMILIES:
        raise ModelError(f"model.family '{family}': not a family; choose auto or one of {', '.join(FAMILIES)}")
    form, location, problem = _locate(name, "model.base")
    base = Base(name, form, location, FAMILIES.get(family), family != "auto", revision=revision,
                allow_pickle=allow_pickle, problem=problem)
    if problem:
        return base
    if form == "file":
        return _single_file(base, config)
    folder = Path(location) if form != "hub" else cached_folder(location, revision)
    if folder is None:
        return base  # a hub id not cached: its family is known once its configs are here (`complete`)
    try:
        index, detected = describe(folder, detect=base.family is None)
    except ModelError as e:
        return replace(base, problem=str(e))
    return replace(base, family=base.family or detected, folder=folder, index=index)


def _locate(value: str, key: str) -> tuple[str, str, str | None]:
    """(form, location, problem) of a `model.base` / `model.config` value, from the file system alone."""
    from finetune.toy import toy_path

    if toy_path(value) is not None:
        if not (toy_path(value) / "model_index.json").is_file():  # a toy base whose build is not committed
            flag = "" if value == "toy" else " --" + value.split("-", 1)[1]
            return "toy", str(toy_path(value)), (f"{key} '{value}': this toy base is not built in this checkout; build "
                                                 f"it with `python tools/make_toy_model.py{flag}` (docs/toy.md)")
        return "toy", str(toy_path(value)), None
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            return "folder", str(path), (
                f"{key} '{value}': folder has no model_index.json; point it at a diffusers model folder "
                "(the one holding unet/, vae/, text_encoder/ ...) or at a single .safetensors file")
        return "folder", str(path), None
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        problem = None if path.is_file() else f"{key} '{value}': file does not exist; check the path"
        return "file", str(path), problem
    if value.startswith((".", "/", "~")) or os.sep in value.strip("/").replace("/", "", 1):
        return "folder", value, f"{key} '{value}': no such folder or file; check the path"
    return "hub", value, None


def _single_file(base: Base, config: str | None) -> Base:
    """A single-file checkpoint: its matching configs located; a .safetensors file's family read from its header
    (a pickle's only once the loader completes it, and only with `model.allow_pickle`)."""
    if base.location.lower().endswith(PICKLE_SUFFIXES) and not base.allow_pickle:
        return replace(base, problem=(
            f"model.base '{base.name}' is a pickle checkpoint, which can run code when loaded; convert it to "
            ".safetensors, or set model.allow_pickle: true to load it with weights_only=True"))
    where = None
    if config:
        _, where, problem = _locate(config, "model.config")
        if problem:
            return replace(base, problem=problem)
    base = replace(base, config=where)
    if base.family is not None or not base.location.lower().endswith(".safetensors"):
        return base
    try:
        return base.known_as(describe(base.location)[1])
    except ModelError as e:
        return replace(base, problem=str(e))


def cached_folder(repo: str, revision: str | None = None) -> Path | None:
    """The local Hugging Face cache's snapshot folder of a hub id whose model_index.json is there, else None."""
    if repo.startswith((".", "/", "~")) or repo.count("/") != 1 or Path(repo).suffix:
        return None
    from huggingface_hub import try_to_load_from_cache

    index = try_to_load_from_cache(repo, "model_index.json", revision=revision)
    return Path(index).parent if isinstance(index, str) else None


def load_failure(name: str, form: str, e: Exception, key: str = "model.base") -> str:
    """One line for a base (or VAE) that could not be fetched or loaded."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if form == "hub" and offline:
        return (
            f"{key} '{name}' is not in the local Hugging Face cache and the hub is offline "
            f"(HF_HUB_OFFLINE=1): download it once with `hf download {name}` or set {key} to a local folder"
        )
    if form == "hub":
        return f"{key} '{name}' could not be loaded from the hub ({str(e).splitlines()[0]}); check the id"
    return f"{key} '{name}' could not be loaded: {str(e).splitlines()[0]}"
