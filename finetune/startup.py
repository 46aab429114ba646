"""Start-up: leave out the optional libraries a run cannot use, before the heavy imports.

diffusers imports bitsandbytes whenever it is installed, the first time any model class loads (its quantizer
registry does), and peft does the same for its quantized LoRA layers: about 0.9 CPU-seconds of every process
start (measured: `import diffusers.training_utils, peft` 5.6 -> 4.7 CPU-s on the 2-core CI machine), paid by
every rank and by every run that never quantizes. `leave_out_bitsandbytes` marks bitsandbytes absent for this
process (`sys.modules[name] = None`: `importlib.util.find_spec` then answers None, so diffusers, transformers
and peft take their "not installed" branches) — only when nothing the run can load needs it:

- no bitsandbytes kind in `model.quantize` / `model.quantize_text_encoders`, no `adamw8bit` optimizer;
- every base the run reads (model.base, its single file's `model.config`, validation.base) is on this machine
  and carries no bitsandbytes quantization: no `quantization_config` naming it in the folder's JSON configs,
  no bitsandbytes quantization state among a single file's tensor names. A hub id not in the local cache cannot
  be looked at before it downloads, so it keeps bitsandbytes.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

BNB_KINDS = ("nf4", "int8")
# what a bitsandbytes-quantized model leaves in its configs and tensor names
_CONFIG_MARKS = ("bitsandbytes", "load_in_4bit", "load_in_8bit")
_TENSOR_MARKS = ("quant_state.bitsandbytes", ".absmax", ".quant_map", ".SCB")


def leave_out_bitsandbytes(recipe) -> bool:
    """Mark bitsandbytes absent for this process when the run cannot need it; True when it did."""
    if "bitsandbytes" in sys.modules or needs_bitsandbytes(recipe):
        return False
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]  # "not installed" for find_spec and import
    return True


def needs_bitsandbytes(recipe) -> bool:
    """Whether the run may use bitsandbytes (a quantize kind, the 8-bit optimizer, or a base it cannot rule out)."""
    m = recipe.model
    if m.quantize in BNB_KINDS or m.quantize_text_encoders in BNB_KINDS or recipe.train.optimizer == "adamw8bit":
        return True
    return any(_may_be_quantized(base) for base in (recipe.base, recipe.validation_base) if base is not None)


def _may_be_quantized(base) -> bool:
    if base.form == "file":
        if _file_is_quantized(Path(base.location)):
            return True
        config = None if base.config is None else _local_folder(base.config)  # its configs: a folder or hub id
        return base.config is not None and (config is None or _folder_is_quantized(config))
    if base.folder is None:  # a hub id not in the cache: unknown until it downloads
        return True
    return _folder_is_quantized(Path(base.folder))


def _local_folder(value: str) -> Path | None:
    from finetune.models.base import cached_folder

    path = Path(value).expanduser()
    return path if path.is_dir() else cached_folder(value)


def _folder_is_quantized(folder: Path) -> bool:
    configs = [*folder.glob("*.json"), *folder.glob("*/config.json")]
    for path in configs:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            return True  # unreadable: cannot rule it out
        if any(mark in text for mark in _CONFIG_MARKS):
            return True
    return False


def _file_is_quantized(path: Path) -> bool:
    """A safetensors file whose header names bitsandbytes quantization state (a pickle checkpoint: unknown)."""
    if path.suffix != ".safetensors":
        return True
    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            names = json.loads(f.read(size)).keys()
    except (OSError, ValueError, struct.error):
        return True
    return any(mark in name for name in names for mark in _TENSOR_MARKS)
