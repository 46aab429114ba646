"""`finetune env`: what a bug report needs, and the start-up check for known-bad package combinations.

    finetune env               # versions of the whole stack, the device and its free memory
    finetune env --check       # exit 2 with one line when an installed combination is known to break
    finetune env --diff LOCK   # which installed versions differ from a lock file (make test-latest)

The compatibility check reads installed versions from package metadata only (no imports), so it costs
milliseconds and runs before any model loads.
"""

from __future__ import annotations

import platform
import re
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

STACK = ("torch", "diffusers", "peft", "transformers", "accelerate", "datasets", "bitsandbytes",
         "safetensors", "tokenizers", "huggingface-hub", "compel", "numpy", "pillow", "pydantic")


@dataclass(frozen=True)
class KnownBad:
    """`package` at `version_from` or newer needs `needs` at `needs_from` or newer."""

    package: str
    version_from: str
    needs: str
    needs_from: str
    symptom: str


KNOWN_BAD = (
    KnownBad("transformers", "5.24.0", "peft", "0.22.0",
             "every text-encoder LoRA load and export fails with 'The version of PEFT you are using is not "
             "compatible'"),
)


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _key(version: str) -> tuple:
    """A sortable key for release versions ('2.13.0+cpu' -> (2, 13, 0)); pre-release tags sort first."""
    from packaging.version import Version

    return (Version(version).release, not Version(version).is_prerelease)


def incompatibilities(versions: dict[str, str | None] | None = None) -> list[str]:
    """One line per known-bad combination among the installed (or given) versions."""
    get = (lambda n: (versions or {}).get(n)) if versions is not None else installed
    problems = []
    for bad in KNOWN_BAD:
        have, dep = get(bad.package), get(bad.needs)
        if have is None or dep is None:
            continue
        if _key(have) >= _key(bad.version_from) and _key(dep) < _key(bad.needs_from):
            problems.append(
                f"{bad.package} {have} needs {bad.needs} >= {bad.needs_from} but {bad.needs} {dep} is installed "
                f"({bad.symptom}); fix: pip install '{bad.package}<{bad.version_from}' or "
                f"'{bad.needs}>={bad.needs_from}', or reinstall from the lock: make setup"
            )
    return problems


def check_compatibility() -> None:
    """Raise a one-line UserError for the first known-bad combination (called before models load)."""
    from finetune.errors import UserError

    problems = incompatibilities()
    if problems:
        raise UserError(problems[0])


def _device_lines() -> list[str]:
    import torch

    lines = [f"torch build: {torch.__version__} (CUDA {torch.version.cuda or 'none'}, "
             f"cuDNN {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else 'none'})"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            cap = ".".join(map(str, torch.cuda.get_device_capability(i)))
            lines.append(f"device {i}: {torch.cuda.get_device_name(i)} (compute {cap}), "
                         f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free, bf16 "
                         f"{'yes' if torch.cuda.is_bf16_supported() else 'no'}")
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        lines.append("device: Apple MPS")
    else:
        lines.append(f"device: CPU only, {torch.get_num_threads()} threads")
    lines.append(f"host memory: {_host_memory()}")
    return lines


def _host_memory() -> str:
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        free = int(info["MemAvailable"].split()[0]) / 2**20
        total = int(info["MemTotal"].split()[0]) / 2**20
        return f"{free:.1f} of {total:.1f} GiB available"
    except (OSError, KeyError, ValueError):
        return "unknown"


def report() -> str:
    """The environment as plain text, ready to paste into an issue."""
    from finetune import __version__

    lines = [f"finetune: {__version__}",
             f"python: {sys.version.split()[0]} ({platform.python_implementation()}, {sys.executable})",
             f"platform: {platform.platform()}"]
    lines += [f"{name}: {installed(name) or 'not installed'}" for name in STACK]
    for extra in ("xformers", "torchao", "wandb"):
        if installed(extra):
            lines.append(f"{extra}: {installed(extra)}")
    lines += _device_lines()
    problems = incompatibilities()
    lines += [f"PROBLEM: {p}" for p in problems] or ["known-bad combinations: none"]
    return "\n".join(lines)


def lock_diff(lock: str | Path) -> list[str]:
    """Installed packages whose version differs from `lock` (a pip requirements file with == pins)."""
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s\\;]+)", Path(lock).read_text(), re.M))
    out = []
    for name, pinned in sorted(pins.items()):
        have = installed(name)
        if have != pinned:
            out.append(f"{name}: lock {pinned}, installed {have or 'none'}")
    return out


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="finetune env", description="Print the environment for bug reports.")
    p.add_argument("--check", action="store_true", help="exit 2 with one line if a known-bad combination is installed")
    p.add_argument("--diff", metavar="LOCK", help="list installed versions that differ from a lock file")
    args = p.parse_args(argv)
    if args.check:
        problems = incompatibilities()
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        return 2 if problems else 0
    if args.diff:
        diff = lock_diff(args.diff)
        print("\n".join(diff) if diff else f"installed versions equal {args.diff}")
        return 0
    print(report())
    return 0
