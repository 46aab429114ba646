"""How a base is meant to be sampled, and whether it was distilled: what its publisher says, read from the base.

    Sampling(steps=4, guidance=0.0, shift="1.0 (static)", distilled=("guidance", "steps"), what="FLUX.1 [schnell]")

A guidance-distilled base (FLUX.1 [dev], Krea) takes the guidance scale as an input instead of running CFG; a
step-distilled one (FLUX.1 [schnell], Z-Image-Turbo, FLUX.2 [klein] 4B / 9B) samples in a few steps, without CFG.
Training a LoRA directly on a step-distilled base breaks those few steps (docs/toy.md measures it): the recipe
warns, and names the two routes that work (train on the undistilled base and validate on the distilled one, or
train through a training adapter).

Each family lists its variants (`Family.variants`): a `Variant` says which base it is (config values, the
model_index.json, words of the base's name) and how it samples. The first that fits wins, else the family's
`sampling` (its undistilled default). A shipped toy says it in its toy_build.json ("sampler", "distilled_from").
Nothing here loads weights or imports torch: the configs are the few JSON files `Base` resolution reads anyway.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DISTILLED = ("guidance", "steps")  # what a base can be distilled for


@dataclass(frozen=True)
class Sampling:
    """A base's sampling defaults. `steps` / `guidance` None: the publisher gives none (the recipe's own defaults
    apply); `guidance` is the value the family's pipeline takes (CFG scale, or a distilled guidance input; 0 or 1:
    no CFG). `shift` says how the scheduler shifts the noise levels (from its config: static or by resolution)."""

    steps: int | None = None
    guidance: float | None = None
    shift: str | None = None
    distilled: tuple[str, ...] = ()  # 'guidance' and / or 'steps'
    what: str = ""  # which base this is, for messages and model cards ('FLUX.1 [schnell]')
    source: str = ""  # how it was told: 'configs', 'name', 'toy_build.json', 'family default'

    @property
    def step_distilled(self) -> bool:
        return "steps" in self.distilled

    @property
    def guidance_distilled(self) -> bool:
        return "guidance" in self.distilled

    def describe(self) -> str:
        kind = " and ".join(f"{d}-distilled" for d in self.distilled) or "not distilled"
        parts = [f"{self.steps} steps" if self.steps else None,
                 f"guidance {self.guidance:g}" if self.guidance is not None else None,
                 f"shift {self.shift}" if self.shift else None]
        return f"{self.what or 'base'}: {kind}; samples with " + (", ".join(p for p in parts if p) or "its defaults")


@dataclass(frozen=True)
class Variant:
    """One published variant of a family. `configs` maps 'component.key' ('transformer.guidance_embeds',
    'scheduler.use_dynamic_shifting', 'model_index.is_distilled') to the value it must have; `names` are words, any
    of which in the base's name (hub id, folder or file name; case ignored) marks it. A variant with both needs
    both; with neither, never fits."""

    sampling: Sampling
    configs: Mapping[str, Any] = field(default_factory=dict)
    names: tuple[str, ...] = ()

    def fits(self, configs: Mapping[str, Mapping[str, Any]], name: str) -> bool:
        if not self.configs and not self.names:
            return False
        for key, want in self.configs.items():
            component, _, item = key.partition(".")
            if configs.get(component, {}).get(item) != want:
                return False
        return not self.names or any(word.lower() in name.lower() for word in self.names)


def read_configs(folder: Path | None, index: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """model_index.json and every component's config.json (the scheduler's scheduler_config.json) of a diffusers
    folder, by component name; {} where the folder is not on this machine."""
    out: dict[str, dict[str, Any]] = {"model_index": dict(index or {})}
    if folder is None or not Path(folder).is_dir():
        return out
    folder = Path(folder)
    if not index and (folder / "model_index.json").is_file():
        out["model_index"] = _json(folder / "model_index.json")
    for path in [*folder.glob("*/config.json"), *folder.glob("scheduler/scheduler_config.json")]:
        out[path.parent.name] = _json(path)
    return out


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def scheduler_shift(configs: Mapping[str, Mapping[str, Any]]) -> str | None:
    """How the base's flow-matching scheduler shifts its noise levels, in words."""
    sched = configs.get("scheduler", {})
    if "shift" not in sched and "use_dynamic_shifting" not in sched:
        return None
    if sched.get("use_dynamic_shifting"):
        return "by resolution"
    return f"{float(sched.get('shift', 1.0)):g} (static)"


def toy_sampling(folder: Path | None) -> Sampling | None:
    """A shipped toy's own record (toy_build.json): how it is sampled, and whether it was distilled from another."""
    info = _json(Path(folder) / "toy_build.json") if folder is not None else {}
    sampler = info.get("sampler")
    if not sampler:
        return None
    distilled = DISTILLED if info.get("distilled_from") else ()
    what = f"a toy distilled from {info['distilled_from']}" if distilled else "a toy base"
    return Sampling(sampler.get("steps"), sampler.get("guidance"), None, distilled, what, "toy_build.json")


def sampling_of(family, folder: Path | None, index: Mapping[str, Any] | None, name: str) -> Sampling:
    """What `family`'s base at `folder` (index: its model_index.json) named `name` is, and how it samples."""
    toy = toy_sampling(folder)
    configs = read_configs(folder, index)
    shift = scheduler_shift(configs)
    if toy is not None:
        return _with_shift(toy, shift)
    for variant in getattr(family, "variants", ()):
        if variant.fits(configs, name):
            how = "configs" if variant.configs else "name"
            return _with_shift(Sampling(**{**variant.sampling.__dict__, "source": how}), shift)
    default = getattr(family, "sampling", None) or Sampling(guidance=getattr(family, "default_guidance", None))
    return _with_shift(Sampling(**{**default.__dict__, "source": "family default"}), shift)


def _with_shift(s: Sampling, shift: str | None) -> Sampling:
    return s if s.shift or shift is None else Sampling(**{**s.__dict__, "shift": shift})
