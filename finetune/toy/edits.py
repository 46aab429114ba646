"""Toy edits: exact instruction pairs from the toy world, and how an edit model's outputs are scored.

A pair is an input image (a shape of one colour at some place, on some background) and its target: the same shape,
place and background in the instructed colour ("make it red"), or the instructed shape in the same colour and place
("make it a circle"). Training inputs take any hue more than 20 degrees from purple's (so copying a colour has to be
learned as copying, not as a table of the palette) and the shapes below; held-out inputs are what training never
showed as an input (the palette's purple, a circle), so a score on them is about the instruction, not memory.

An output is scored against its pair: the instructed colour (or shape) is there, the input's shape (or colour) is
kept, and the position is kept (the object's mask overlaps the target's with IoU >= 0.5; for a colour edit the
target's mask is the input's). numpy + PIL only.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from finetune.toy import world

TRAIN_SHAPES = ("square", "triangle", "star", "heart")  # input shapes training shows
HELD_OUT_COLOURS = ("purple",)  # input colours only the held-out inputs have
HELD_OUT_SHAPES = ("circle",)  # ... and input shapes
HELD_OUT_HUES = 20.0  # degrees around a held-out colour's hue no training input takes
IOU_KEPT = 0.5
_COLOUR = re.compile(r"make it (\w+)$")
_SHAPE = re.compile(r"make it an? (\w+)$")


@dataclass(frozen=True)
class Instruction:
    text: str
    colour: str | None = None  # the instructed colour, or
    shape: str | None = None  # the instructed shape


def parse(text: str) -> Instruction:
    """'make it <colour>' or 'make it a <shape>' with the toy world's words; ValueError otherwise."""
    shape, colour = _SHAPE.match(text.strip()), _COLOUR.match(text.strip())
    if shape and shape[1] in world.SHAPES:
        return Instruction(text, shape=shape[1])
    if colour and colour[1] in world.COLOURS:
        return Instruction(text, colour=colour[1])
    raise ValueError(f"'{text}' is not a toy edit; say 'make it <colour>' ({', '.join(world.COLOURS)}) or "
                     f"'make it a <shape>' ({', '.join(world.SHAPES)})")


@dataclass(frozen=True)
class Pair:
    instruction: Instruction
    input: Image.Image
    target: Image.Image
    colour: str  # the input's
    shape: str  # the input's
    background: str


def training_colour(rng: random.Random, avoid: str | None) -> tuple[int, int, int]:
    """A saturated colour of any hue at least HELD_OUT_HUES degrees from purple's that the scorer does not read as
    `avoid` (the instructed colour), at the palette's saturation and brightness: between the palette's hues too,
    so a colour is copied, not named."""
    import colorsys

    from finetune.toy.score import _PALETTE_HUES, colour_of

    held = [_PALETTE_HUES[c] for c in HELD_OUT_COLOURS]
    while True:
        hue = rng.uniform(0.0, 360.0)
        if any(abs((hue - h + 180.0) % 360.0 - 180.0) < HELD_OUT_HUES for h in held):
            continue
        r, g, b = colorsys.hsv_to_rgb(hue / 360.0, rng.uniform(0.75, 0.88), rng.uniform(0.75, 0.94))
        rgb = round(r * 255), round(g * 255), round(b * 255)
        if colour_of(world.draw("square", [rgb])) != avoid:
            return rgb


def pair(instruction: Instruction, rng: random.Random, held_out: bool = False) -> Pair:
    """One pair: an input the instruction changes (never already its colour or shape), and the exact target."""
    from finetune.toy.score import colour_of

    if held_out:
        colour = rng.choice([c for c in HELD_OUT_COLOURS if c != instruction.colour])
        shape = rng.choice([s for s in (*TRAIN_SHAPES[:3], *HELD_OUT_SHAPES) if s != instruction.shape])
    else:
        colour = training_colour(rng, instruction.colour)
        shape = rng.choice([s for s in TRAIN_SHAPES if s != instruction.shape])
    bg = rng.choice(world.BACKGROUNDS)
    cx, cy, r = world._placement(rng)
    seed = rng.randrange(1 << 30)  # the same background pattern in both
    paint = [colour] if isinstance(colour, tuple) else colour  # world.draw takes names or a list of RGB
    source = world.draw(shape, paint, bg, cx, cy, r, seed=seed)
    target = world.draw(instruction.shape or shape, instruction.colour or paint, bg, cx, cy, r, seed=seed)
    name = colour if isinstance(colour, str) else colour_of(source)  # the palette name it reads as
    return Pair(instruction, source, target, name, shape, bg)


def pairs(instructions: list[str], n: int, seed: int = 0, held_out: bool = False) -> list[Pair]:
    """`n` pairs cycling through the instructions, the same for the same arguments."""
    parsed = [parse(t) for t in instructions]
    rng = random.Random(f"edits:{seed}:{held_out}")
    return [pair(parsed[i % len(parsed)], rng, held_out) for i in range(n)]


# ------------------------------------------------------------------------------------------- scoring
def iou(a, b) -> float:
    """Overlap of two images' object masks (intersection over union of the toy scorer's masks)."""
    from finetune.toy.score import object_mask

    ma, mb = object_mask(a) > 0.5, object_mask(b) > 0.5
    union = np.logical_or(ma, mb).sum()
    return float(np.logical_and(ma, mb).sum() / union) if union else 0.0


def score_one(output, p: Pair) -> dict[str, bool]:
    """edit: the instructed colour or shape; kept: the input's other property; position: mask IoU with the
    target's >= 0.5; all: the three at once."""
    from finetune.toy.score import colour_of, shape_of

    colour, shape = colour_of(output), shape_of(output)
    ins = p.instruction
    edit = colour == ins.colour if ins.colour else shape == ins.shape
    kept = shape == p.shape if ins.colour else colour == p.colour
    position = iou(output, p.target) >= IOU_KEPT
    return {"edit": edit, "kept": kept, "position": position, "all": edit and kept and position}


def score(outputs, ps: list[Pair]) -> dict[str, dict[str, float]]:
    """Per instruction: the share of its samples meeting each measure (and the sample count)."""
    rows: dict[str, list[dict[str, bool]]] = {}
    for out, p in zip(outputs, ps, strict=True):
        rows.setdefault(p.instruction.text, []).append(score_one(out, p))
    return {text: {k: float(np.mean([r[k] for r in rs])) for k in rs[0]} | {"n": len(rs)}
            for text, rs in rows.items()}


def describe(scores: dict[str, dict[str, float]]) -> str:
    """'make it red': edit 0.95 kept 0.91 position 0.97 all 0.88 (n 32); ... one instruction per line."""
    return "\n".join(f"'{t}': " + " ".join(f"{k} {v:.2f}" for k, v in s.items() if k != "n") + f" (n {s['n']})"
                     for t, s in scores.items())


# ------------------------------------------------------------------------------------------- running
def edit_pipeline(path=None, lora=None):
    """A stock FluxKontextPipeline over a FLUX-shaped toy model (default the shipped base), optionally with a LoRA
    folder or file loaded; fp32, progress bars off."""
    import torch
    from diffusers import FluxKontextPipeline

    from finetune.toy import toy_path

    pipe = FluxKontextPipeline.from_pretrained(path or toy_path("toy-flux"), dtype=torch.float32)
    if lora is not None:
        pipe.load_lora_weights(lora)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, ps: list[Pair], seed: int = 0, steps: int = 28, guidance: float = 2.0, chunk: int = 32) -> list:
    """Each pair's input edited by its instruction through the stock Kontext pipeline, as the model card says to
    call it on the toy: its own 64 px size (no auto-resize), max_area 64*64, 32 T5 tokens, true CFG against the
    empty instruction (the toy has no guidance input). Sample i draws its noise from seed + i."""
    import torch

    out = []
    for i in range(0, len(ps), chunk):
        part = ps[i : i + chunk]
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(part))]
        out += pipe(prompt=[p.instruction.text for p in part], image=[p.input for p in part],
                    negative_prompt=[""] * len(part), true_cfg_scale=guidance, num_inference_steps=steps,
                    _auto_resize=False, max_area=world.SIZE**2, height=world.SIZE, width=world.SIZE,
                    max_sequence_length=32, generator=gens).images
    return out
