"""Full-model exports (DreamBooth, merged LoRAs): a diffusers folder and a single-file LDM checkpoint.

- `save_diffusers_folder`: `pipe.save_pretrained` (safetensors) into a temporary sibling folder, our metadata
  stamped into every weights file, then renamed into place: the folder appears complete or not at all.
- `save_single_file`: the original checkpoint key layout of the family (finetune.export.ldm: SD 1.x, SD 2.x
  with OpenCLIP names, SDXL with both text encoders under conditioner.embedders.*) in one .safetensors, which
  ComfyUI, A1111 and the family pipeline's `from_single_file(path, config=<diffusers folder>)` open.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from finetune.errors import ModelError
from finetune.export.io import DTYPES, read_tensors, save_safetensors


def save_diffusers_folder(pipe, out_dir: str | Path, meta: dict[str, str] | None = None,
                          overwrite: bool = False) -> Path:
    """Write `pipe` as a diffusers folder atomically (temp folder + rename)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ModelError(f"{out_dir}: already exists; choose another folder or allow overwriting")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if meta:
            for f in sorted(tmp.rglob("*.safetensors")):
                tensors, old = read_tensors(f)
                save_safetensors(tensors, f, old | meta)
        old_dir = None
        if out_dir.exists():
            old_dir = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old_dir, ignore_errors=True)
            out_dir.rename(old_dir)
        tmp.rename(out_dir)
        if old_dir is not None:
            shutil.rmtree(old_dir, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def save_single_file(comps, path: str | Path, meta: dict[str, str] | None = None, dtype: str = "fp32",
                     unet=None, text_encoders=None) -> Path:
    """One original-layout .safetensors holding U-Net, VAE and every text encoder of `comps`' family
    (`unet` / `text_encoders` replace the components' own, e.g. the trained ones)."""
    from finetune.export.ldm import pipeline_to_ldm

    family = comps.family
    encoders = dict(zip(comps.text_encoder_names, text_encoders or comps.text_encoders, strict=True))
    state = pipeline_to_ldm(family, unet or comps.denoiser, comps.vae, encoders, DTYPES[dtype])
    meta = dict(meta or {})
    meta.setdefault("modelspec.sai_model_spec", "1.0.0")
    return save_safetensors(state, path, meta)


def export_full(comps, out_dir: Path, ctx, unet=None, text_encoders=None) -> list[Path]:
    """What a full fine-tune (DreamBooth) run writes: `model/` (diffusers), `<name>.safetensors` (single
    file, with the single_file format; kohya/a1111 accepted too) and the model card."""
    from finetune.export.card import write_model_card
    from finetune.export.context import common_metadata
    from finetune.export.kohya import prediction

    family = comps.family
    pipe = comps.pipeline(denoiser=unet, text_encoders=text_encoders)
    dtype = DTYPES[ctx.dtype]
    meta = common_metadata(ctx) | {
        "modelspec.architecture": family.modelspec_arch.get(ctx.prediction_type, family.name),
        "modelspec.prediction_type": prediction(ctx),
        "modelspec.title": ctx.name, "modelspec.date": ctx.created,
        "modelspec.trigger_phrase": ", ".join(ctx.trigger_words),
        "modelspec.resolution": f"{ctx.resolution}x{ctx.resolution}",
    }
    written: list[Path] = []
    if "diffusers" in ctx.formats:
        if dtype != torch.float32:
            pipe.to(dtype)
        written.append(save_diffusers_folder(pipe, out_dir / "model", meta, overwrite=True))
        if dtype != torch.float32:
            pipe.to(torch.float32)
    if {"single_file", "kohya", "a1111"} & set(ctx.formats):
        encoders = [getattr(pipe, n) for n in family.text_encoder_names]
        written.append(save_single_file(comps, out_dir / f"{ctx.name}.safetensors", meta, ctx.dtype,
                                        unet=pipe.unet, text_encoders=encoders))
    if ctx.model_card:
        written.append(write_model_card(out_dir, ctx, written, kind="full"))
    return written
