"""Shared plumbing of the tools/ CLIs: import path, one-line errors (exit 2), base loading."""

from __future__ import annotations

import os
import pathlib
import sys

# `python tools/x.py` puts tools/ first on sys.path, where a tool named like a module (merge, convert, ...)
# could shadow a library import: take tools/ off the path and put the repository root there instead.
_TOOLS = pathlib.Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != _TOOLS]
sys.path.insert(0, str(_TOOLS.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# bitsandbytes warns at import (through peft) about optional CPU kernels it cannot find: not the user's concern
__import__("logging").getLogger("bitsandbytes").setLevel(40)


def run(main, argv=None) -> int:
    """Call main(argv); a UserError (or a missing file) prints one line and returns 2, a full disk or a
    refused write returns 3; no traceback."""
    from finetune.env import check_compatibility
    from finetune.errors import UserError

    try:
        check_compatibility()  # metadata only: milliseconds, before any model or file is read
        return main(argv) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except FileNotFoundError as e:
        print(f"error: {e.filename or e}: no such file", file=sys.stderr)
        return 2
    except OSError as e:
        from finetune.errors import environment_problem

        line = environment_problem(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted; nothing more written", file=sys.stderr)
        return 130


def quiet() -> None:
    """Library chatter off: the tools print what matters themselves. A library not imported yet is told through
    its environment switch (read when it loads): importing diffusers here would cost seconds of start-up."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("diffusers", "transformers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(name, "error")
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        if name in sys.modules:
            sys.modules[name].set_verbosity_error()
            sys.modules[name].disable_progress_bar()


def load_base(base: str, family: str = "auto", config: str | None = None, allow_pickle: bool = False):
    """Components of a base, accepting every form recipe `model.base` accepts (incl. 'toy')."""
    from finetune.models.base import resolve_base
    from finetune.models.components import load_components

    quiet()
    return load_components(resolve_base(base, family=family, config=config, allow_pickle=allow_pickle).complete())


def check_energy(energy: float | None) -> None:
    """--energy is a fraction of each layer's energy to keep (NaN fails the comparison too)."""
    from finetune.errors import ModelError

    if energy is not None and not 0.0 < energy <= 1.0:
        raise ModelError(f"--energy {energy}: must be in (0, 1], the fraction of each layer's energy to keep")


def add_family_arg(p, help_text: str = "model family") -> None:
    from finetune.models.families import FAMILIES

    p.add_argument("--family", default="auto", choices=["auto", *FAMILIES], help=help_text)


def family_of(name: str):
    """The family object of a --family value (None for 'auto': read from the file)."""
    from finetune.models.families import FAMILIES

    return None if name == "auto" else FAMILIES[name]


def add_base_args(p) -> None:
    p.add_argument("--base", required=True, help="base model: diffusers folder, hub id, .safetensors file or 'toy'")
    add_family_arg(p)
    p.add_argument("--config", help="for a single-file base: a diffusers folder with the matching configs")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read .ckpt/.pt/.bin files (weights_only=True); refused otherwise")


def check_score_args(args, counts: tuple[str, ...], files: tuple[str, ...] = ("results.json", "grid.png")) -> None:
    """The toy scoring tools' shared checks, before a model loads: each count at least 1, the run folder there,
    the results not overwritten without --overwrite. One line naming the value."""
    from finetune.errors import UserError

    for name in counts:
        if getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)}: must be at least 1")
    if not pathlib.Path(args.lora).exists():
        raise UserError(f"{args.lora}: no such run folder or LoRA file; pass the run's output_dir")
    for name in files:
        if (pathlib.Path(args.out) / name).exists() and not args.overwrite:
            raise UserError(f"{pathlib.Path(args.out) / name} exists; choose another --out or pass --overwrite")


def write_score_results(out: str | pathlib.Path, results: dict, rows: list, labels: list[str]) -> None:
    """A toy scoring tool's outputs, each written atomically: OUT/results.json and the labelled grid OUT/grid.png."""
    import json

    from finetune.export.io import atomic_path, write_text_atomic
    from finetune.train.validation import grid

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "results.json", json.dumps(results, indent=2))
    with atomic_path(out / "grid.png") as tmp:
        grid(rows, labels).save(tmp, format="PNG")
    print(f"wrote {out / 'results.json'} and {out / 'grid.png'}")
