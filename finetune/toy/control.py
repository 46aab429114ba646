"""The toy control task: put the object where a mask says. Held-out world images (another seed than training's)
give captions and object masks; the trained control model renders each caption with its mask through its stock
control pipeline, the untouched base renders the caption alone (its chance of hitting the mask), and both are
scored by mask IoU (finetune/eval/control.py).

What a run trained decides the toy and the pipelines (`load`):

- a Control LoRA (a run folder or its LoRA file): the FLUX toy, `FluxControlPipeline` (its loader widens the
  toy's input projection) against `FluxPipeline`, no CFG;
- a ControlNet (a run folder with `controlnet/`, or that folder): `ControlNetModel` -> the SD toy,
  `StableDiffusionControlNetPipeline` against `StableDiffusionPipeline`, with CFG as the SD toy is sampled;
  `FluxControlNetModel` -> the FLUX toy, `FluxControlNetPipeline` against `FluxPipeline`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

#: a ControlNet's config class -> (toy base name, its stock ControlNet pipeline)
CONTROLNETS = {"ControlNetModel": ("toy", "StableDiffusionControlNetPipeline"),
               "FluxControlNetModel": ("toy-flux", "FluxControlNetPipeline")}


@dataclass(frozen=True)
class Case:
    caption: str
    mask: Image.Image  # white on the object, black elsewhere (the control image)


@dataclass
class Scored:
    """A trained control model and the untouched base of its toy, with the way that toy samples."""

    kind: str  # "Control LoRA" or "ControlNet" (the grid's label)
    tuned: object  # the stock control pipeline with the trained part
    base: object  # the stock text-to-image pipeline of the same toy base
    steps: int  # the toy's sampling steps
    guidance: float | None  # the SD toy's CFG scale; None: the FLUX toy's control path samples without CFG


def cases(n: int, seed: int) -> list[Case]:
    """`n` held-out world images' captions and masks (training draws with data.sources' seed, 0 in the recipes)."""
    from finetune.data.control import toy_mask
    from finetune.toy import world

    return [Case(caption, toy_mask(img)) for img, caption in world.world_images(n, seed)]


def load(run: str | Path) -> Scored:
    """The run's control pipeline over its toy base (the trained part loaded first: a file the pipeline cannot read
    fails before anything else loads) and that toy's untouched text-to-image pipeline."""
    import diffusers

    from finetune.export.controlnet import controlnet_folder, read_controlnet
    from finetune.toy import toy_path
    from finetune.toy.evaluate import load_pipeline, sampler_settings

    found = controlnet_folder(run)
    if found is None:
        from diffusers import FluxControlPipeline

        base = toy_path("toy-flux")
        pipe = FluxControlPipeline.from_pretrained(base, dtype=torch.float32)
        pipe.load_lora_weights(run)
        kind, guidance = "Control LoRA", None
    else:
        cls = found[1] if found[1] in CONTROLNETS else "ControlNetModel"  # another class: refused, named, next
        name, pipeline = CONTROLNETS[cls]
        net = read_controlnet(found[0], cls)
        base = toy_path(name)
        pipe = getattr(diffusers, pipeline).from_pretrained(base, controlnet=net, dtype=torch.float32)
        kind, guidance = "ControlNet", sampler_settings(base)["guidance"] if name == "toy" else None
    pipe.set_progress_bar_config(disable=True)
    return Scored(kind, pipe, load_pipeline(base), sampler_settings(base)["steps"], guidance)


@torch.no_grad()
def render(pipe, items: list[Case], steps: int, guidance: float | None = None, controlled: bool = True,
           conditioning_scale: float = 1.0, chunk: int = 16) -> list[Image.Image]:
    """One image per case at 64 px, seed i for case i (the same for the trained model and the base), `chunk`
    cases per pipeline call (each with its own generator: the same images as one by one, to float rounding).
    `guidance`: the CFG scale of an SD pipeline (None: a FLUX toy pipeline, sampled without CFG at the T5 length
    it was trained at). `controlled`: the case's mask goes in as the pipeline's control image; ControlNet
    pipelines scale the ControlNet's residuals by `conditioning_scale`."""
    params = inspect.signature(pipe.__call__).parameters
    extra = {"guidance_scale": guidance} if guidance is not None else {"guidance_scale": 0.0,
                                                                       "max_sequence_length": 32}
    if "controlnet_conditioning_scale" in params:
        extra["controlnet_conditioning_scale"] = conditioning_scale
    out = []
    for first in range(0, len(items), chunk):
        part = items[first:first + chunk]
        if controlled:
            extra["control_image" if "control_image" in params else "image"] = [c.mask for c in part]
        out += pipe(prompt=[c.caption for c in part], height=64, width=64, num_inference_steps=steps,
                    generator=[torch.Generator().manual_seed(first + i) for i in range(len(part))], **extra).images
    return out


def score(outputs: list[Image.Image], items: list[Case]) -> dict[str, float]:
    """Mean mask IoU and the share of outputs with IoU >= 0.5 against each case's mask."""
    from finetune.eval.control import fidelity

    ious = [fidelity(o, c.mask, "toy_mask") for o, c in zip(outputs, items, strict=True)]
    return {"iou": sum(ious) / len(ious), "hit": sum(v >= 0.5 for v in ious) / len(ious), "n": len(ious)}
