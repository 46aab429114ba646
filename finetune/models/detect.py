"""Which family a base is, read from its files without loading any weights (finetune/models/base.py asks).

- a diffusers folder: model_index.json, the denoiser's config.json and text_encoder/config.json
  (`family_from_configs` asks each registered family);
- a single-file checkpoint: the key names of its state dict; each family lists the key prefixes that name
  it (`Family.single_file_signs`), e.g.

      model.diffusion_model.joint_blocks.* SD3 / SD3.5 (MMDiT)
      conditioner.embedders.1.model.*      SDXL base (CLIP-L in embedders.0, OpenCLIP-bigG in embedders.1)
      cond_stage_model.model.*             SD 2.x (OpenCLIP-H)
      cond_stage_model.transformer.*       SD 1.x (OpenAI CLIP-L)

v-prediction (SD 2.x 768 px) is not visible in the weights: it is a scheduler setting, which for a single
file comes from `model.config` (or `model.prediction_type`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from finetune.errors import ModelError
from finetune.models.families import FAMILIES
from finetune.models.family import Family

SDXL_REFINER_SIGN = "conditioner.embedders.0.model."


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: unreadable config ({e}); re-download or fix the model folder") from None


def family_from_configs(model_index: dict[str, Any], denoiser_config: dict[str, Any],
                        text_encoder_config: dict[str, Any] | None = None) -> Family:
    """The family of a diffusers model from its model_index.json, the denoiser's config.json and (optionally)
    text_encoder/config.json. Families are asked in priority order; SD 1.x is the fallback."""
    for family in sorted(FAMILIES.values(), key=lambda f: -f.priority):
        if family.matches(model_index, denoiser_config, text_encoder_config or {}):
            return family
    raise NotImplementedError(
        f"no family recognises this model (denoiser {model_index.get('transformer') or model_index.get('unet')}); "
        f"supported: {', '.join(FAMILIES)}"
    )


def family_of_folder(path: str | Path) -> Family:
    """The family of a diffusers model folder, from its config files alone."""
    path = Path(path)
    index = read_json(path / "model_index.json")
    if not index:
        raise ModelError(f"{path}: no model_index.json; not a diffusers model folder")
    try:
        denoiser = read_json(path / "transformer" / "config.json") or read_json(path / "unet" / "config.json")
        return family_from_configs(index, denoiser, read_json(path / "text_encoder" / "config.json"))
    except NotImplementedError as e:
        raise ModelError(f"{path}: {e}") from None


def family_of_keys(keys: Iterable[str], source: str = "checkpoint") -> Family:
    """The family of an original-layout (LDM/SGM) state dict, from its key names."""
    keys = list(keys)
    for family in sorted(FAMILIES.values(), key=lambda f: -f.priority):
        if any(k.startswith(family.single_file_signs) for k in keys if family.single_file_signs):
            return family
    if any(k.startswith(SDXL_REFINER_SIGN) for k in keys):
        raise ModelError(f"{source}: an SDXL refiner checkpoint (one OpenCLIP text encoder) is not supported; "
                         "use an SDXL base model")
    raise ModelError(
        f"{source}: not a checkpoint of a family we recognise ({', '.join(FAMILIES)}: no key starts with any of "
        "their signs); set model.family and model.config if it is one"
    )


def checkpoint_keys(path: str | Path, allow_pickle: bool = False) -> list[str]:
    """Key names of a single-file checkpoint; .safetensors reads only the header."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception as e:  # safetensors raises its own error types for damaged headers
            raise ModelError(f"{path}: not a readable .safetensors file ({e})") from None
    if not allow_pickle:
        raise ModelError(f"{path}: a pickle checkpoint; set model.allow_pickle: true to read it (weights_only)")
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - a damaged zip, a foreign pickle, a non-torch file: all the user's file
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise ModelError(f"{path}: not a readable torch checkpoint ({first}); convert it to .safetensors or "
                         "download it again") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else {}
    return list(state)


def family_of_checkpoint(path: str | Path, allow_pickle: bool = False) -> Family:
    return family_of_keys(checkpoint_keys(path, allow_pickle), str(path))


def describe(path: str | Path, allow_pickle: bool = False, detect: bool = True) -> tuple[dict, Family | None]:
    """What a base's files say, without reading weights: (model_index.json, family) of a diffusers folder, ({},
    family) of a single-file checkpoint; family None where `detect` is off (the recipe names it)."""
    path = Path(path)
    if path.is_dir():
        return read_json(path / "model_index.json"), family_of_folder(path) if detect else None
    return {}, family_of_checkpoint(path, allow_pickle) if detect else None
