"""Command line: train from a recipe.

    accelerate launch finetune/run.py recipes/lora.yaml [key.path=value ...]
    python -m finetune recipes/lora.yaml --check        # validate, scan the data, load no model
    finetune recipes/lora.yaml --print                  # show the fully resolved recipe
    finetune --resume output/lora                       # continue a stopped run from its folder
    finetune estimate recipes/lora.yaml [overrides]     # expected peak GPU memory, no weights read
    finetune env                                        # versions and device, for bug reports
    finetune studio [--host H] [--port N] [--root DIR]  # the local web studio (finetune/studio/)

User mistakes print one or two lines on stderr and exit with code 2; nothing is written. torch and
diffusers are imported only after the recipe has validated, and only by what needs them: `--help`,
`--check`, `--print` and the studio's start never import them.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    # Run as a script (accelerate launch finetune/run.py): Python put finetune/ itself on sys.path,
    # where our sub-packages (data, models, ...) could shadow other modules. Put the repo root there.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))


COMMANDS = """commands:
  finetune RECIPE [key.path=value ...]    train (on several GPUs: accelerate launch finetune/run.py RECIPE ...)
  finetune RECIPE --check                 validate the recipe and scan the data; loads no model
  finetune --resume RUN_DIR               continue a stopped run from its folder (its recipe.yaml)
  finetune estimate RECIPE [...]          expected peak GPU memory before anything loads (estimate --help)
  finetune studio [--host H] [--port N]   the local web studio: data, recipes, runs (studio --help)
  finetune env [--check]                  versions and device, for bug reports (env --help)

Overrides use dotted keys: train.lr=1e-4 method.rank=32 data.sources.0.path=/data/dog
Your own pictures on the toy base (offline, CPU): finetune recipes/toy/my_pictures.yaml data.sources.0.path=DIR
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="finetune", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=COMMANDS,
        description="Fine-tune a text-to-image diffusion model from a recipe YAML.",
    )
    p.add_argument("recipe", nargs="?", help="recipe YAML file (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="override recipe keys")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in this folder from its last checkpoint, with the recipe it ran with")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="validate the recipe, scan the data, and exit")
    mode.add_argument("--print", dest="print_", action="store_true", help="print the resolved recipe and exit")
    mode.add_argument("--estimate", action="store_true",
                      help="print the expected peak accelerator memory (built from configs, no weights) and exit")
    return p


def _estimate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="finetune estimate",
        description="Expected peak GPU memory of a recipe, per component, before anything is downloaded or loaded: "
        "the models are built from their configs without weights and one training step is traced.",
        epilog="Example: finetune estimate recipes/flux/lora.yaml train.batch_size=2 model.quantize=nf4",
    )
    p.add_argument("recipe", help="recipe YAML file (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="override recipe keys")
    return p


def _arguments(argv: list[str]) -> argparse.Namespace:
    """The command line, with `finetune estimate ...` and `--resume RUN_DIR` turned into a recipe and overrides."""
    if argv[:1] == ["estimate"]:
        args = _estimate_parser().parse_intermixed_args(argv[1:])
        args.estimate, args.check, args.print_, args.resume = True, False, False, None
        return args
    p = _parser()
    args = p.parse_intermixed_args(argv)
    if args.resume is None:
        if args.recipe is None:
            p.error("give a recipe YAML (or --resume RUN_DIR)")
        return args
    if args.recipe is not None:  # `--resume DIR key=value`: argparse took the first override for the recipe
        args.overrides = [args.recipe, *args.overrides]
    run = Path(args.resume)
    if not (run / "recipe.yaml").is_file():
        _fail(f"--resume {run}: no recipe.yaml there; give the folder of a run that started (its train.output_dir)")
    args.recipe = str(run / "recipe.yaml")
    args.overrides = [*args.overrides, "train.resume=latest"]
    return args


def _fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    own_process = argv is None  # the command line, not a caller sharing its interpreter (and its imports)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["env"] or argv[:1] == ["--env"]:
        from finetune.env import main as env_main

        raise SystemExit(env_main(argv[1:]))
    if argv[:1] == ["studio"]:  # `finetune studio ...`: the web app (finetune/studio/)
        from finetune.studio.cli import main as studio

        return studio(argv[1:])
    args = _arguments(argv)
    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):  # read once, when the library first loads:
        os.environ.setdefault(name, "error")  # its info and warnings are not the user's concern (our own lines are)
    import logging

    # bitsandbytes warns at import about optional CPU kernels it cannot find; that is not the user's concern
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from finetune.errors import UserError
    from finetune.recipe import dump_recipe, load_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.print_:
            print(dump_recipe(recipe), end="")
            return
        if args.estimate:
            from finetune.memory.estimate import estimate, report

            print(report(recipe, estimate(recipe)))
            return
        if args.check:
            from finetune.data.check import check_data
            from finetune.routes import recipe_warnings

            for line in recipe_warnings(recipe):
                print(f"warning: {line}", file=sys.stderr)
            print(check_data(recipe))
            return
        from finetune.env import check_compatibility
        from finetune.startup import leave_out_bitsandbytes

        if own_process:  # before diffusers / peft import it: ~0.9 CPU-s a process (finetune/startup.py)
            leave_out_bitsandbytes(recipe)
        from finetune.train.distributed import die_with_launcher
        from finetune.train.trainer import train

        die_with_launcher()  # a rank of a killed launcher must not train on as an orphan

        check_compatibility()  # a known-bad package pair fails here, before any model loads
        train(recipe)
    except UserError as e:
        _fail(str(e), e.exit_code)
    except RuntimeError as e:  # a collective whose peer died: one line here, the cause is the peer's error
        from finetune.train.distributed import peer_lost

        line = peer_lost(e)
        if line is None:
            raise
        _fail(line, 1)
    except OSError as e:  # a full disk or a refused write (checkpoints, exports): the user's to fix
        from finetune.errors import environment_problem

        line = environment_problem(e)
        if line is None:
            raise
        _fail(line, 3)
    except KeyboardInterrupt:
        # Ctrl-C outside the training steps (class images, caches, the step-0 grid; or a second Ctrl-C),
        # where the loop's own clean stop is not listening: one line, not a traceback from deep inside torch
        if os.environ.get("RANK", "0") == "0":  # every process of a launch gets the signal; one line is enough
            print("interrupted (Ctrl-C); what was finished is kept (class images, caches, the last checkpoint): "
                  "run the same command with train.resume=latest to go on", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
