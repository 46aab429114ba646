"""ControlNet exports: `controlnet/` (config.json + diffusion_pytorch_model.safetensors), the folder a stock
`<Family>ControlNetModel.from_pretrained` loads, and `<name>_controlnet.safetensors`, the same tensors with the
same (diffusers) names in one file: ComfyUI's ControlNet loader reads that form (comfy/controlnet.py tells it by
`controlnet_cond_embedding.conv_in.weight` for U-Nets, `controlnet_x_embedder.weight` for FLUX)."""

from __future__ import annotations

from pathlib import Path

from finetune.export.card import write_model_card
from finetune.export.context import ExportContext, common_metadata
from finetune.export.io import DTYPES, save_safetensors, write_text_atomic

FOLDER = "controlnet"
WEIGHTS = "diffusion_pytorch_model.safetensors"


def export_controlnet(net, out_dir: Path, ctx: ExportContext) -> list[Path]:
    state = {k: v.detach().to("cpu", DTYPES[ctx.dtype]).contiguous() for k, v in net.state_dict().items()}
    meta = common_metadata(ctx, {"finetune.controlnet_class": type(net).__name__})
    written: list[Path] = []
    if "diffusers" in ctx.formats:
        folder = Path(out_dir) / FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        written.append(save_safetensors(state, folder / WEIGHTS, meta))
        written.append(write_text_atomic(folder / "config.json", net.to_json_string()))
    if "single_file" in ctx.formats:
        written.append(save_safetensors(state, Path(out_dir) / f"{ctx.name}_controlnet.safetensors", meta))
    if ctx.model_card:
        written.append(write_model_card(Path(out_dir), ctx, written, kind="controlnet"))
    return written


def controlnet_folder(path: str | Path) -> tuple[Path, str] | None:
    """(folder, class name) of the diffusers ControlNet a path holds: a run folder's `controlnet/`, or such a folder
    itself; None when it holds none (a LoRA, a file)."""
    import json

    path = Path(path)
    for folder in (path / FOLDER, path):
        config = folder / "config.json"
        if config.is_file() and (folder / WEIGHTS).is_file():
            try:
                cls = json.loads(config.read_text()).get("_class_name", "")
            except (ValueError, AttributeError):
                continue
            if cls.endswith("ControlNetModel"):
                return folder, cls
    return None


def read_controlnet(path: str | Path, cls: str):
    """The ControlNet a run exported (its folder, or the run folder), as diffusers class `cls` (the base family's):
    a one-line ModelError naming the path for anything else."""
    import diffusers
    import torch

    from finetune.errors import ModelError

    found = controlnet_folder(path)
    if found is None:
        raise ModelError(f"{path}: no diffusers ControlNet here (config.json + {WEIGHTS}); give a controlnet run's "
                         f"folder or its {FOLDER}/ folder")
    folder, have = found
    if have != cls:
        raise ModelError(f"{folder}: a {have}, but this base takes a {cls}; give a ControlNet trained on this "
                         "base's family")
    try:
        return getattr(diffusers, cls).from_pretrained(folder, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - safetensors and diffusers each raise their own types
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise ModelError(f"{folder}: not a ControlNet diffusers loads ({type(e).__name__}: {first})") from None
