#!/usr/bin/env python
"""Score a toy Control LoRA on held-out masks against the untouched FLUX toy base; write the numbers and a grid.

    python tools/score_toy_control.py output/toy-flux-control --n 32 --out toy-control-scores

n held-out world images (drawn with --seed; the recipe trains on seed 0) give captions and object masks. The LoRA
renders each caption with its mask through the stock FluxControlPipeline (its loader widens the toy's input
projection); the untouched base renders the caption alone through FluxPipeline: its chance of putting the object
where the mask is. Both are scored by mask IoU of the output's object with the mask (mean, and the share with
IoU >= 0.5). Writes results.json and grid.png (masks | the base's outputs | the LoRA's) to --out.
"""

from __future__ import annotations

import argparse

import _common


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("lora", help="the run folder (or its pytorch_lora_weights.safetensors)")
    p.add_argument("--n", type=int, default=32, help="held-out masks")
    p.add_argument("--seed", type=int, default=1, help="which held-out images are drawn (training draws seed 0)")
    p.add_argument("--steps", type=int, default=28, help="Euler steps")
    p.add_argument("--columns", type=int, default=8, help="samples in the grid")
    p.add_argument("--out", default="toy-control-scores", help="folder for results.json and grid.png")
    p.add_argument("--overwrite", action="store_true", help="replace results.json and grid.png in --out")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from finetune.errors import UserError
    from finetune.toy import control

    args = parse_args(argv)
    _common.check_score_args(args, ("n", "steps", "columns"))
    _common.quiet()
    try:
        tuned = control.pipelines(args.lora)
    except Exception as e:  # noqa: BLE001 - safetensors, peft and diffusers each raise their own types
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{args.lora}: not a Control LoRA FluxControlPipeline loads ({type(e).__name__}: "
                        f"{first})") from None
    items = control.cases(args.n, args.seed)
    outputs = {"lora": control.render(tuned, items, args.steps),
               "base": control.render(control.pipelines(None), items, args.steps, controlled=False)}
    scores = {k: control.score(v, items) for k, v in outputs.items()}
    for k, s in scores.items():
        print(f"{k}: mask IoU {s['iou']:.3f}, IoU >= 0.5 in {s['hit']:.2f} of {s['n']}", flush=True)
    k = args.columns
    rows = [[c.mask for c in items[:k]], outputs["base"][:k], outputs["lora"][:k]]
    labels = ["control (held-out masks)", "untouched base (caption only)", "Control LoRA (caption + mask)"]
    _common.write_score_results(args.out, {"args": vars(args), **scores}, rows, labels)
    return 0


if __name__ == "__main__":
    raise SystemExit(_common.run(main))
