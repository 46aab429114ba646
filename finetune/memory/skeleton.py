"""A recipe's base as meta-device modules: every component built from its config.json, no weights read.

A local diffusers folder (or the toy base) is read as is; a hub id is read from the local Hugging Face cache
when its configs are there, else from the published configs shipped in finetune/models/configs/ (SD 1.5, SDXL,
SD 3.5, FLUX.1, Qwen-Image, Z-Image, FLUX.2 [klein], Wan 2.1 / 2.2: finetune/models/reference.py). Tokenizers
load for real (small files; stand-ins of the same kind where a reference folder ships none): the family's own
`encode_prompt` then runs on the meta encoders, so the text conditioning has exactly the shapes training sees.
"""

from __future__ import annotations

import json
from pathlib import Path

from finetune.errors import ModelError
from finetune.models.base import Base
from finetune.models.components import Components, LoadOptions
from finetune.models.reference import meta_module


def meta_components(base: Base, options: LoadOptions | None = None) -> Components:
    """The recipe's base (its `Base` value) on the meta device, frozen, as the trainer's `Components`."""
    from finetune.models.components import freeze
    from finetune.models.detect import family_of_folder
    from finetune.models.reference import REFERENCE_IDS, reference_folder

    options = options or LoadOptions()
    folder = _config_folder(base)
    if folder is None and base.name in REFERENCE_IDS:
        folder = reference_folder(REFERENCE_IDS[base.name])
    if folder is None:
        raise ModelError(f"model.base '{base.name}': its configs are not on this machine (not a folder, not in "
                         "the Hugging Face cache, no reference architecture); download the base once, or point "
                         "model.base at a local diffusers folder")
    index = json.loads((folder / "model_index.json").read_text())
    modules = {name: meta_module(folder / name, entry[1]) for name, entry in index.items() if _is_model(entry)}
    tokenizers = {name: _tokenizer(folder / name, entry[1]) for name, entry in index.items()  # FLUX.2 [dev]'s is a
                  if isinstance(entry, list) and entry[1] and ("Tokenizer" in entry[1] or name.startswith("tokenizer"))}
    family = base.family or family_of_folder(folder)  # not cached: the reference architecture's
    present = [n for n in family.text_encoder_names if n in modules and n not in options.drop_text_encoders]
    toks = [tokenizers[family.tokenizer_names[family.text_encoder_names.index(n)]] for n in present]
    slots = dict.fromkeys([family.denoiser_name, *family.experts.values()])
    experts = {n: modules[n] for n in slots if n in modules}  # Wan 2.2 A14B: both experts stay resident
    trained = tuple(experts) if options.experts == "all" else (family.experts[options.experts],)
    comps = Components(denoiser=experts[trained[0]], experts=experts, trained_experts=trained, vae=modules["vae"],
                       text_encoders=[modules[n] for n in present], tokenizers=toks, scheduler=None,
                       family=family, base=base, prediction_type="auto",
                       text_encoder_names=tuple(present), max_sequence_length=options.max_sequence_length)
    freeze(comps)
    return comps


def _config_folder(base: Base) -> Path | None:
    """The diffusers folder holding the base's configs: the base's own, or its snapshot in the local cache."""
    if base.form == "file":
        raise ModelError(f"model.base '{base.name}': the estimate reads diffusers folders and hub ids; give "
                         "model.config (a diffusers folder of the same architecture) for a single file")
    base.check()
    return base.folder


def _is_model(entry) -> bool:
    return isinstance(entry, list) and len(entry) == 2 and entry[0] in ("diffusers", "transformers") and \
        entry[1] is not None and not entry[1].endswith(("Tokenizer", "TokenizerFast", "Scheduler")) and \
        "Scheduler" not in entry[1] and "Processor" not in entry[1] and "Extractor" not in entry[1]


def _tokenizer(folder: Path, cls_name: str):
    """The folder's tokenizer; a stand-in of the same kind where it ships none (the reference configs)."""
    import transformers

    from finetune.models.reference import stand_in_tokenizer

    if not folder.is_dir():
        return stand_in_tokenizer(cls_name)
    return getattr(transformers, cls_name).from_pretrained(folder)
