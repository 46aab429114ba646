#!/usr/bin/env python
"""Score a toy edit LoRA on held-out inputs against the untouched FLUX toy base; write the numbers and a grid.

    python tools/score_toy_edit.py output/toy-flux-edit --n 16 --out toy-edit-scores

Each instruction edits n held-out pairs (purple objects and circles: inputs training never shows) through the
stock FluxKontextPipeline, once with the LoRA and once without, on the same inputs and seeds, as the model card
calls it (64 px, true CFG against the empty instruction). Per instruction, the share of samples with the
instructed colour (or shape) ("edit"), the input's other property kept ("kept"), the object in place (mask IoU
with the target >= 0.5, "position") and all three at once ("all"). Writes results.json and grid.png (per
instruction: inputs, the base's outputs, the LoRA's) to --out.
"""

from __future__ import annotations

import argparse

import _common

SHIPPED = ["make it red", "make it blue", "make it green", "make it a circle"]  # recipes/toy/flux_edit.yaml's


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("lora", help="the run folder (or its pytorch_lora_weights.safetensors)")
    p.add_argument("--instructions", nargs="+", default=SHIPPED, help="the instructions scored")
    p.add_argument("--n", type=int, default=16, help="held-out pairs per instruction")
    p.add_argument("--seed", type=int, default=1, help="which held-out pairs are drawn")
    p.add_argument("--steps", type=int, default=28, help="Euler steps")
    p.add_argument("--guidance", type=float, default=2.0, help="true CFG scale (the recipe's validation value)")
    p.add_argument("--columns", type=int, default=6, help="samples per instruction in the grid")
    p.add_argument("--out", default="toy-edit-scores", help="folder for results.json and grid.png")
    p.add_argument("--overwrite", action="store_true", help="replace results.json and grid.png in --out")
    return p.parse_args(argv)


def _check(args) -> None:
    """Every value before a model loads: one line naming it."""
    import math

    from finetune.errors import UserError

    if not math.isfinite(args.guidance) or args.guidance < 1:
        raise UserError(f"--guidance {args.guidance}: must be a finite number >= 1 (1: no true CFG)")
    _common.check_score_args(args, ("n", "steps", "columns"))


def _pipelines(lora):
    """(name, pipeline) for the LoRA (loaded first: a file the pipeline cannot read fails before any sampling)
    and the untouched base."""
    from finetune.errors import UserError
    from finetune.toy import edits

    _common.quiet()  # no loading bars or library warnings: the scores are the output
    try:
        tuned = edits.edit_pipeline(lora=lora)
    except Exception as e:  # noqa: BLE001 - safetensors, peft and diffusers each raise their own types
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{lora}: not a LoRA the toy's Kontext pipeline loads ({type(e).__name__}: {first})") from None
    return (("lora", tuned), ("base", edits.edit_pipeline()))


def main(argv=None) -> int:
    from finetune.errors import UserError
    from finetune.toy import edits

    args = parse_args(argv)
    _check(args)
    try:
        ps = edits.pairs(args.instructions, args.n * len(args.instructions), seed=args.seed, held_out=True)
    except ValueError as e:
        raise UserError(f"--instructions: {e}") from None
    outputs, scores = {}, {}
    for name, pipe in _pipelines(args.lora):
        outputs[name] = edits.run(pipe, ps, steps=args.steps, guidance=args.guidance)
        scores[name] = edits.score(outputs[name], ps)
        print(f"{name}:\n{edits.describe(scores[name])}", flush=True)
    rows, labels = [], []
    for k, text in enumerate(args.instructions):
        idx = list(range(k, len(ps), len(args.instructions)))[: args.columns]  # pairs cycle through instructions
        for what, images in (("inputs", [p.input for p in ps]), ("base", outputs["base"]),
                             ("LoRA", outputs["lora"])):
            rows.append([images[i] for i in idx])
            labels.append(f"{text}: {what}")
    _common.write_score_results(args.out, {"args": vars(args), "base": scores["base"], "lora": scores["lora"]},
                                rows, labels)
    return 0


if __name__ == "__main__":
    raise SystemExit(_common.run(main))
