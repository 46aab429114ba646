"""Command line: train from a recipe.

    accelerate launch finetune/run.py recipes/lora.yaml [key.path=value ...]
    python -m finetune recipes/lora.yaml --check        # validate, scan the data, load no model
    finetune recipes/lora.yaml --print                  # show the fully resolved recipe
    finetune estimate recipes/lora.yaml [overrides]     # expected peak GPU memory, no weights read
    finetune env                                        # versions and device, for bug reports
    finetune studio [--host H] [--port N] [--root DIR]  # the local web studio (finetune/studio/)

User mistakes print one or two lines on stderr and exit with code 2; nothing is written. torch and
diffusers are imported only after the recipe has validated.
"""

from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__" and __package__ in (None, ""):
    # Run as a script (accelerate launch finetune/run.py): Python put finetune/ itself on sys.path,
    # where our sub-packages (data, models, ...) could shadow other modules. Put the repo root there.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="finetune",
        description="Fine-tune a text-to-image diffusion model from a recipe YAML.",
        epilog="Overrides use dotted keys: train.lr=1e-4 data.sources.0.path=/data/dog method.rank=32",
    )
    p.add_argument("recipe", help="recipe YAML file (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="override recipe keys")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="validate the recipe, scan the data, and exit")
    mode.add_argument("--print", dest="print_", action="store_true", help="print the resolved recipe and exit")
    mode.add_argument("--estimate", action="store_true",
                      help="print the expected peak accelerator memory (built from configs, no weights) and exit")
    return p


def _fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["env"] or argv[:1] == ["--env"]:
        from finetune.env import main as env_main

        raise SystemExit(env_main(argv[1:]))
    if argv[:1] == ["studio"]:  # `finetune studio ...`: the web app (finetune/studio/)
        from finetune.studio.cli import main as studio

        return studio(argv[1:])
    if argv[:1] == ["estimate"]:  # `finetune estimate RECIPE ...` = `finetune RECIPE ... --estimate`
        argv = [*argv[1:], "--estimate"]
    args = _parser().parse_intermixed_args(argv)
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
