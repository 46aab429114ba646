#!/usr/bin/env python
"""Score a toy control run on held-out masks against its untouched toy base; write the numbers and a grid.

    python tools/score_toy_control.py output/toy-flux-control --n 32 --out toy-control-scores
    python tools/score_toy_control.py output/toy-controlnet --n 32 --out toy-controlnet-scores

n held-out world images (drawn with --seed; the recipes train on seed 0) give captions and object masks. The run
says which toy it is: a Control LoRA (recipes/toy/flux_control.yaml) renders through the stock FluxControlPipeline
on the FLUX toy (its loader widens the toy's input projection); a ControlNet (recipes/toy/controlnet.yaml, the SD
toy; or a FluxControlNetModel on the FLUX toy) through the stock ControlNet pipeline. The untouched base of the
same toy renders the caption alone: its chance of putting the object where the mask is. Both are sampled alike
(SD: DDIM with CFG, --guidance; FLUX: Euler without) and scored by mask IoU of the output's object with the mask
(mean, and the share with IoU >= 0.5). Writes results.json and grid.png (masks | the base's outputs | the trained
model's) to --out.
"""

from __future__ import annotations

import argparse

import _common


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("lora", metavar="run",
                   help="the run folder (or its pytorch_lora_weights.safetensors, or its controlnet/ folder)")
    p.add_argument("--n", type=int, default=32, help="held-out masks")
    p.add_argument("--seed", type=int, default=1, help="which held-out images are drawn (training draws seed 0)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the toy's own, SD 25, FLUX 28)")
    p.add_argument("--guidance", type=float, default=None,
                   help="the SD toy's CFG scale (default: the toy's own, 6; the FLUX toy samples without CFG)")
    p.add_argument("--conditioning-scale", type=float, default=1.0,
                   help="a ControlNet's residual scale (the pipelines' controlnet_conditioning_scale)")
    p.add_argument("--columns", type=int, default=8, help="samples in the grid")
    p.add_argument("--out", default="toy-control-scores", help="folder for results.json and grid.png")
    p.add_argument("--overwrite", action="store_true", help="replace results.json and grid.png in --out")
    return p.parse_args(argv)


def _check(args) -> None:
    """Every value before a model loads: one line naming it."""
    import math

    from finetune.errors import UserError

    if args.guidance is not None and (not math.isfinite(args.guidance) or args.guidance < 1):
        raise UserError(f"--guidance {args.guidance}: must be a finite number >= 1 (1: no CFG)")
    if not math.isfinite(args.conditioning_scale) or args.conditioning_scale < 0:
        raise UserError(f"--conditioning-scale {args.conditioning_scale}: must be a finite number >= 0")
    _common.check_score_args(args, ("n", "columns") + (("steps",) if args.steps is not None else ()))
    if args.guidance is not None:
        from finetune.export.controlnet import controlnet_folder

        found = controlnet_folder(args.lora)
        if found is None or found[1] != "ControlNetModel":
            raise UserError(f"--guidance: {args.lora} is a FLUX toy run, sampled without CFG; leave --guidance out")


def main(argv=None) -> int:
    from finetune.errors import UserError
    from finetune.toy import control

    args = parse_args(argv)
    _check(args)
    for name in ("diffusers", "transformers"):  # loaded for the pipelines anyway: imported first, quiet() also
        __import__(name)                         # stops their loading bars
    _common.quiet()
    try:
        run = control.load(args.lora)
    except Exception as e:  # noqa: BLE001 - safetensors, peft and diffusers each raise their own types
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{args.lora}: not a Control LoRA or ControlNet the toy's control pipelines load "
                        f"({type(e).__name__}: {first})") from None
    items = control.cases(args.n, args.seed)
    steps = args.steps or run.steps
    guidance = run.guidance if args.guidance is None else args.guidance
    outputs = {"trained": control.render(run.tuned, items, steps, guidance,
                                         conditioning_scale=args.conditioning_scale),
               "base": control.render(run.base, items, steps, guidance, controlled=False)}
    scores = {k: control.score(v, items) for k, v in outputs.items()}
    for k, s in scores.items():
        print(f"{k}: mask IoU {s['iou']:.3f}, IoU >= 0.5 in {s['hit']:.2f} of {s['n']}", flush=True)
    k = args.columns
    rows = [[c.mask for c in items[:k]], outputs["base"][:k], outputs["trained"][:k]]
    labels = ["control (held-out masks)", "untouched base (caption only)", f"{run.kind} (caption + mask)"]
    _common.write_score_results(args.out, {"args": vars(args), "model": run.kind, "steps": steps,
                                           "guidance": guidance, **scores}, rows, labels)
    return 0


if __name__ == "__main__":
    raise SystemExit(_common.run(main))
