"""The toy control task: put the object where a mask says. Held-out world images (another seed than training's)
give captions and object masks; a Control LoRA renders each caption with its mask through the stock
FluxControlPipeline, the untouched base renders the caption alone (its chance of hitting the mask), and both are
scored by mask IoU (finetune/eval/control.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image


@dataclass(frozen=True)
class Case:
    caption: str
    mask: Image.Image  # white on the object, black elsewhere (the control image)


def cases(n: int, seed: int) -> list[Case]:
    """`n` held-out world images' captions and masks (training draws with data.sources' seed, 0 in the recipe)."""
    from finetune.data.control import toy_mask
    from finetune.toy import world

    return [Case(caption, toy_mask(img)) for img, caption in world.world_images(n, seed)]


def pipelines(lora: str | None):
    """The stock FluxControlPipeline over the toy base with the LoRA (its loader widens the input), or the
    untouched FluxPipeline (lora None)."""
    from diffusers import FluxControlPipeline, FluxPipeline

    from finetune.toy import toy_flux_base_path

    if lora is None:
        pipe = FluxPipeline.from_pretrained(toy_flux_base_path(), dtype=torch.float32)
    else:
        pipe = FluxControlPipeline.from_pretrained(toy_flux_base_path(), dtype=torch.float32)
        pipe.load_lora_weights(lora)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def render(pipe, items: list[Case], steps: int = 28, controlled: bool = True) -> list[Image.Image]:
    out = []
    for i, case in enumerate(items):  # one seed per case, the same for the LoRA and the base
        extra = {"control_image": case.mask} if controlled else {"guidance_scale": 0.0}
        out.append(pipe(prompt=case.caption, height=64, width=64, num_inference_steps=steps, max_sequence_length=32,
                        generator=torch.Generator().manual_seed(i), **extra).images[0])
    return out


def score(outputs: list[Image.Image], items: list[Case]) -> dict[str, float]:
    """Mean mask IoU and the share of outputs with IoU >= 0.5 against each case's mask."""
    from finetune.eval.control import fidelity

    ious = [fidelity(o, c.mask, "toy_mask") for o, c in zip(outputs, items, strict=True)]
    return {"iou": sum(ious) / len(ious), "hit": sum(v >= 0.5 for v in ious) / len(ious), "n": len(ious)}
