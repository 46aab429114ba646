"""LoRA (and DoRA, its weight-decomposed form): delta = scale * B @ A.

DoRA keeps a magnitude per output feature (peft: [out] for Linear, [1, out, 1, 1] for Conv2d) and makes the
weight m * (W + dW) / ||W + dW||, the norm taken per output row. The UIs cannot apply that from a kohya file:
AUTOMATIC1111 normalises over input columns whatever the stored shape, and ComfyUI, when the magnitude is per
output row, divides by the base weight's norm instead of the adapted one. So DoRA layers are not written in
kohya form (the diffusers file keeps them exact; `tools/merge.py fuse` bakes them into a checkpoint).
"""

from __future__ import annotations

from typing import Any

from finetune.errors import ModelError
from finetune.kinds.base import AdapterKind

MAGNITUDE = "lora_magnitude_vector"
DORA_IN_KOHYA = ("DoRA layers cannot be written in kohya form: AUTOMATIC1111 normalises the magnitude over input "
                 "columns and ComfyUI divides by the base weight's norm, so neither applies it exactly; use the "
                 "diffusers file, or bake it into a checkpoint with tools/merge.py fuse --single-file")


class LoRA(AdapterKind):
    name = "lora"
    kohya_names = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight", MAGNITUDE: "dora_scale"}
    # transformers keeps a text encoder's DoRA magnitude only under this name (see export/lora.py)
    aliases = {f"{MAGNITUDE}.weight": MAGNITUDE}
    required = ((("lora_A.weight", "lora_B.weight"),),)
    alpha_key = "lora_alpha"
    diffusers_file = True
    supports_dora = True

    def peft_config(self, rank, alpha, targets, dropout=0.0, use_dora=False):
        from peft import LoraConfig

        return LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout,
                          use_dora=use_dora, init_lora_weights="gaussian")

    def rebuild_config(self, common, alpha, alpha_pattern, layers):
        from peft import LoraConfig

        return LoraConfig(**common, lora_alpha=alpha, alpha_pattern=alpha_pattern,
                          use_dora=any(MAGNITUDE in layer.tensors for layer in layers))

    def rank(self, tensors):
        return int(tensors["lora_A.weight"].shape[0])

    def factors(self, tensors):
        return tensors["lora_B.weight"].flatten(1) @ tensors["lora_A.weight"].flatten(1)

    def delta(self, layer, weight):
        d = super().delta(layer, weight)
        if MAGNITUDE not in layer.tensors:
            return d
        w = weight.float()
        new = w + d
        norm = new.norm(p=2, dim=tuple(range(1, new.dim())), keepdim=True)  # per output row, as peft
        m = layer.tensors[MAGNITUDE].float().reshape(norm.shape)
        return m * new / norm - w

    def low_rank(self, layer):
        if MAGNITUDE in layer.tensors:
            return None
        t = layer.tensors
        return t["lora_B.weight"].float() * layer.scale, t["lora_A.weight"].float()

    def to_kohya(self, layer, where):
        if MAGNITUDE in layer.tensors:
            raise ModelError(f"{where}: {DORA_IN_KOHYA}")
        return super().to_kohya(layer, where)

    def from_kohya(self, tensors, alpha, where) -> dict[str, Any]:
        fields = super().from_kohya(tensors, alpha, where)
        t = fields["tensors"]
        if MAGNITUDE in t:
            t[MAGNITUDE] = _peft_magnitude(t[MAGNITUDE], t["lora_B.weight"], where)
        return fields

    def kohya_network(self, conv, rank, alpha):
        if not conv:
            return {"module": "networks.lora", "args": None}
        return {"module": "lycoris.kohya", "args": {"algo": "locon", "conv_dim": str(rank), "conv_alpha": str(alpha)}}


def _peft_magnitude(m, up, where: str):
    """A kohya file's dora_scale in peft's shape. Per output row ([out, 1, ...], LyCORIS' wd_on_out) is what
    peft trains; per input column ([1, in, ...], AUTOMATIC1111's convention) is another model, refused."""
    out = up.shape[0]
    if m.shape[0] == out and m.numel() == out:
        return m.reshape(-1) if up.dim() <= 2 else m.reshape(1, out, *([1] * (up.dim() - 2)))
    raise ModelError(f"{where}: DoRA magnitude of shape {tuple(m.shape)} is per input column, a decomposition "
                     "peft (and finetune) cannot hold; use it in the UI that made it")
