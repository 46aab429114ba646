"""LoKr (LyCORIS): delta = scale * kron(w1, w2), each factor full (`lokr_w1`) or low-rank (`lokr_w1_a @ lokr_w1_b`).

The rank is the inner dimension of a low-rank factor. When both factors are full the tensors show no rank, and
ComfyUI, AUTOMATIC1111 and LyCORIS then apply a scale of 1: peft's alpha / r is baked into lokr_w1 when such a
layer is written in kohya form (and read back as scale 1).
"""

from __future__ import annotations

from finetune.kinds.base import AdapterKind

NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


class LoKr(AdapterKind):
    name = "lokr"
    kohya_names = {n: n for n in NAMES}
    required = ((("lokr_w1",), ("lokr_w1_a", "lokr_w1_b")), (("lokr_w2",), ("lokr_w2_a", "lokr_w2_b")))

    def peft_config(self, rank, alpha, targets, dropout=0.0, use_dora=False):
        from peft import LoKrConfig

        return LoKrConfig(r=rank, alpha=alpha, target_modules=targets, module_dropout=dropout)

    def rebuild_config(self, common, alpha, alpha_pattern, layers):
        from peft import LoKrConfig

        return LoKrConfig(**common, alpha=alpha, alpha_pattern=alpha_pattern,
                          decompose_both=any("lokr_w1_a" in layer.tensors for layer in layers))

    def rank(self, tensors):
        for key in ("lokr_w2_b", "lokr_w1_b"):
            if key in tensors:
                return int(tensors[key].shape[0])
        return None

    def peft_rank(self, layer):
        if layer.rank:
            return int(layer.rank)
        # two full factors: any r of at least half the larger factor side keeps both full in peft
        return int(max(layer.tensors["lokr_w2"].shape[:2]))

    def factors(self, t):
        import torch

        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2)

    def to_kohya(self, layer, where):
        out = super().to_kohya(layer, where)
        if self.rank(layer.tensors) is None and layer.scale != 1.0:
            w1 = out["lokr_w1"]
            out["lokr_w1"] = (w1.float() * layer.scale).to(w1.dtype)
        return out
