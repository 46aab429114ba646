"""The one in-memory form of an adapter file, whatever its layout (diffusers, peft, kohya/LyCORIS).

An `Adapter` is a set of `Layer`s keyed by '<component>.<module path>' ('unet.down_blocks.1...to_q'), each
holding peft-named tensors and the scale its delta is multiplied by; the layer's kind (finetune.kinds) knows
what the tensors mean.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from finetune.kinds import AdapterKind, get_kind

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
PEFT_FILE = "peft_adapter.safetensors"
ADAPTER_META = "lora_adapter_metadata"  # the header key diffusers reads the peft config from
PEFT_META = "finetune.peft_config"
#: modules whose whole weights a LoRA file may carry beside its adapters: the attention's q/k norm scales a FLUX
#: Control LoRA trains with `method.train_norm_layers` (diffusers' FLUX LoRA loader accepts these names and
#: writes them into the transformer as they are)
REPLACED_MODULES = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")


@dataclass
class Layer:
    kind: str  # a registered adapter kind (finetune.kinds)
    tensors: dict[str, torch.Tensor]
    alpha: float
    rank: int  # 0: the tensors show no rank (a LoKr of two full factors)
    scale: float  # the factors' product is multiplied by this

    @property
    def spec(self) -> AdapterKind:
        return get_kind(self.kind)

    @property
    def dora(self) -> bool:
        return "lora_magnitude_vector" in self.tensors


@dataclass
class Adapter:
    layers: dict[str, Layer]
    format: str  # diffusers | peft | kohya
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    family: str | None = None  # the family whose key names were used to read it
    #: whole weights that replace the base's ('<component>.<module path>.weight': REPLACED_MODULES), not deltas
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)

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
