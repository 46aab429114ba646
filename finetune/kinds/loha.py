"""LoHa (LyCORIS): delta = scale * (w1_a @ w1_b) * (w2_a @ w2_b), a Hadamard product of two low-rank matrices."""

from __future__ import annotations

from finetune.kinds.base import AdapterKind

NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


class LoHa(AdapterKind):
    name = "loha"
    kohya_names = {n: n for n in NAMES}  # LyCORIS and peft spell them alike
    required = ((NAMES,),)

    def peft_config(self, rank, alpha, targets, dropout=0.0, use_dora=False):
        from peft import LoHaConfig

        return LoHaConfig(r=rank, alpha=alpha, target_modules=targets, module_dropout=dropout)

    def rebuild_config(self, common, alpha, alpha_pattern, layers):
        from peft import LoHaConfig

        return LoHaConfig(**common, alpha=alpha, alpha_pattern=alpha_pattern)

    def rank(self, tensors):
        return int(tensors["hada_w1_b"].shape[0])

    def factors(self, t):
        return (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
