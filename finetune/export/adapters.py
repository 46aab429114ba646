"""LoRA-family adapter files in any of our layouts, read into one form, and their weight deltas.

An `Adapter` is a set of `Layer`s keyed by '<component>.<module path>' ('unet.down_blocks.1...to_q'),
each holding peft-named tensors (lora_A.weight, lora_B.weight, lora_magnitude_vector, hada_*, lokr_*) and
the scale its delta is multiplied by. Readers accept the diffusers/peft file (`pytorch_lora_weights`), our
peft file for LoHa/LoKr and the kohya/LyCORIS file; `delta` rebuilds a layer's weight change with the
formula every loader uses, so fusing, merging and resizing never need peft at run time.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from finetune.errors import ModelError
from finetune.export.io import read_tensors

LORA_KEYS = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
PEFT_KEYS = LORA_KEYS + LOHA_KEYS + LOKR_KEYS


@dataclass
class Layer:
    kind: str  # lora | loha | lokr
    tensors: dict[str, torch.Tensor]
    alpha: float
    rank: int
    scale: float  # the delta is scale * (product of the factors)

    @property
    def dora(self) -> bool:
        return "lora_magnitude_vector" in self.tensors


@dataclass
class Adapter:
    layers: dict[str, Layer]
    format: str  # diffusers | peft | kohya
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    @property
    def kind(self) -> str:
        kinds = {layer.kind for layer in self.layers.values()}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    @property
    def dora(self) -> bool:
        return any(layer.dora for layer in self.layers.values())

    def components(self) -> list[str]:
        return sorted({k.split(".", 1)[0] for k in self.layers})

    def ranks(self) -> Counter:
        return Counter(layer.rank for layer in self.layers.values())


def kind_of(suffixes) -> str:
    s = set(suffixes)
    if s & set(LOHA_KEYS):
        return "loha"
    if s & set(LOKR_KEYS):
        return "lokr"
    return "lora"


def layer_rank(kind: str, t: dict[str, torch.Tensor]) -> int | None:
    """The rank the tensors show; None for a LoKr whose factors are both full matrices."""
    if kind == "lora":
        return t["lora_A.weight"].shape[0]
    if kind == "loha":
        return t["hada_w1_b"].shape[0]
    for key in ("lokr_w2_b", "lokr_w1_b"):
        if key in t:
            return t[key].shape[0]
    return None


# --------------------------------------------------------------------------------------------- reading
def read_adapter(path: str | Path, allow_pickle: bool = False, family=None) -> Adapter:
    """Read any LoRA-family file we know; a one-line ModelError for anything else."""
    path = Path(path)
    if path.is_dir():
        from finetune.export.lora import DIFFUSERS_FILE, PEFT_FILE

        found = [path / f for f in (DIFFUSERS_FILE, PEFT_FILE) if (path / f).is_file()]
        if not found:
            raise ModelError(f"{path}: folder holds no {DIFFUSERS_FILE} or {PEFT_FILE}")
        path = found[0]
    tensors, meta = read_tensors(path, allow_pickle)
    if not tensors:
        raise ModelError(f"{path}: holds no tensors")
    from finetune.export.kohya import is_kohya, kohya_layers

    if is_kohya(tensors):
        layers = kohya_layers(tensors, path, family)
        fmt = "kohya"
    else:
        configs = _peft_configs(meta)
        layers = _peft_layers(tensors, configs, path)
        fmt = "peft" if "finetune.peft_config" in meta else "diffusers"
    return Adapter(layers=layers, format=fmt, metadata=meta, path=path)


def _peft_configs(meta: dict[str, str]) -> dict[str, dict]:
    """Per-component peft configs from our peft header or diffusers' lora_adapter_metadata."""
    if "finetune.peft_config" in meta:
        return json.loads(meta["finetune.peft_config"])
    configs: dict[str, dict] = {}
    for key, value in json.loads(meta.get("lora_adapter_metadata", "{}")).items():
        component, name = key.split(".", 1)
        configs.setdefault(component, {})[name] = value
    return configs


def _peft_layers(tensors, configs: dict[str, dict], path: Path) -> dict[str, Layer]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        key = key.removesuffix(".lora_magnitude_vector.weight") + (
            ".lora_magnitude_vector" if key.endswith(".lora_magnitude_vector.weight") else "")
        suffix = next((s for s in PEFT_KEYS if key.endswith("." + s)), None)
        if suffix is None or "." not in key:
            raise ModelError(f"{path}: unknown key layout ('{key}'); expected a diffusers, peft or kohya LoRA file")
        grouped.setdefault(key[: -len(suffix) - 1], {})[suffix] = value
    layers = {}
    for name, t in grouped.items():
        component, module = name.split(".", 1)
        cfg = configs.get(component, {})
        kind = kind_of(t)
        r = (cfg.get("rank_pattern") or {}).get(module, cfg.get("r"))
        shown = layer_rank(kind, t)
        rank = int(r or shown or 1)
        alpha = cfg.get("lora_alpha", cfg.get("alpha"))
        alpha = float((cfg.get("alpha_pattern") or {}).get(module, alpha if alpha is not None else rank))
        if kind == "lora" and "lora_A.weight" not in t or kind == "lora" and "lora_B.weight" not in t:
            raise ModelError(f"{path}: layer '{name}' lacks lora_A or lora_B")
        layers[name] = Layer(kind, t, alpha, shown or rank, alpha / rank)
    return layers


# ----------------------------------------------------------------------------------------------- math
def factors_delta(layer: Layer, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """scale * (the factors' product), shaped like the base weight (fp32). DoRA's magnitude is ignored."""
    t = {k: v.float() for k, v in layer.tensors.items()}
    if layer.kind == "lora":
        a, b = t["lora_A.weight"], t["lora_B.weight"]
        d = b.flatten(1) @ a.flatten(1)
    elif layer.kind == "loha":
        d = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    else:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        d = torch.kron(w1, w2)
    if d.numel() != torch.Size(shape).numel():
        raise ValueError(f"delta of {tuple(d.shape)} does not fit a weight of {tuple(shape)}")
    return (d * layer.scale).reshape(shape)


def delta(layer: Layer, weight: torch.Tensor) -> torch.Tensor:
    """The change the layer makes to `weight` (DoRA included: m * (W + dW) / ||W + dW|| - W)."""
    w = weight.float()
    d = factors_delta(layer, w.shape)
    if not layer.dora:
        return d
    new = w + d
    dims = tuple(range(1, new.dim()))
    norm = new.norm(p=2, dim=dims, keepdim=True)
    m = layer.tensors["lora_magnitude_vector"].float().reshape(norm.shape)
    return m * new / norm - w


def fuse(adapter: Adapter, modules: dict[str, torch.nn.Module], strength: float = 1.0) -> int:
    """Add the adapter's deltas (times `strength`) into the weights of `modules`; returns layers fused.

    All layers are checked before any weight changes, so a bad file leaves the model untouched.
    """
    targets = []
    for name, layer in adapter.layers.items():
        component, path = name.split(".", 1)
        if component not in modules:
            raise ModelError(f"{adapter.path}: has layers for '{component}', which this model does not have")
        try:
            module = modules[component].get_submodule(path)
        except AttributeError:
            raise ModelError(f"{adapter.path}: layer '{name}' is not in the base (a LoRA for another "
                             "family or base?)") from None
        weight = getattr(module, "base_layer", module).weight
        try:
            d = delta(layer, weight.data)
        except (ValueError, RuntimeError):
            raise ModelError(f"{adapter.path}: layer '{name}' does not fit the base weight "
                             f"{tuple(weight.shape)} (a LoRA for another family or base?)") from None
        targets.append((weight, d))
    with torch.no_grad():
        for weight, d in targets:
            weight.add_((strength * d).to(weight.dtype))
    return len(targets)
