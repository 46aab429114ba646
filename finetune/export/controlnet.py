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
