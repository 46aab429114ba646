"""What an adapter kind is: `AdapterKind`, the base every kind (LoRA, LoHa, LoKr, ...) extends.

A kind holds everything that differs between LoRA-family adapters: the peft config that trains it, its tensor
names in peft files and in kohya/LyCORIS files, how its rank shows in its tensors, and the weight change its
tensors make. The registry of kinds is `finetune/kinds/__init__.py`. Nothing heavy at import time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from finetune.errors import ModelError

if TYPE_CHECKING:
    import torch


class AdapterKind:
    """The base every kind extends; the defaults fit a kind whose delta is `scale * factors(tensors)`."""

    #: the registry name (the recipe's `method.adapter`)
    name: ClassVar[str] = ""
    #: peft tensor name (after the module path) -> kohya/LyCORIS tensor name (ComfyUI, AUTOMATIC1111)
    kohya_names: ClassVar[dict[str, str]] = {}
    #: other spellings of peft tensor names found in files -> the peft name
    aliases: ClassVar[dict[str, str]] = {}
    #: groups of peft tensor names a layer must hold; a group is satisfied by any one of its alternatives
    #: (an alternative is a tuple of names that must all be there)
    required: ClassVar[tuple[tuple[tuple[str, ...], ...], ...]] = ()
    #: the peft config key that holds alpha (None: the kind has no alpha, its scale is 1)
    alpha_key: ClassVar[str | None] = "alpha"
    #: diffusers' `load_lora_weights` reads it (else the diffusers format is our peft file)
    diffusers_file: ClassVar[bool] = False
    #: the kind takes `use_dora`
    supports_dora: ClassVar[bool] = False

    # ---------------------------------------------------------------------------------------- training
    def peft_config(self, rank: int, alpha: float, targets: list[str], dropout: float = 0.0,
                    use_dora: bool = False) -> Any:
        """The peft config that trains this kind on `targets` (module-name suffixes)."""
        raise NotImplementedError

    def rebuild_config(self, common: dict[str, Any], alpha: float, alpha_pattern: dict[str, float],
                       layers: list) -> Any:
        """A peft config that rebuilds exactly `layers` (one component's); `common` holds r, target_modules
        and rank_pattern."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- math
    def rank(self, tensors: dict[str, torch.Tensor]) -> int | None:
        """The rank the tensors show (None when they show none, e.g. a LoKr of two full factors)."""
        return None

    def peft_rank(self, layer) -> int:
        """The `r` a peft config needs to rebuild the layer."""
        return int(layer.rank or 1)

    def factors(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The product of the layer's factors, unscaled, with as many elements as the base weight."""
        raise NotImplementedError

    def delta(self, layer, weight: torch.Tensor) -> torch.Tensor:
        """The change the layer makes to `weight` (fp32, shaped like it)."""
        t = {k: v.float() for k, v in layer.tensors.items()}
        d = self.factors(t)
        if d.numel() != weight.numel():
            raise ValueError(f"delta of {tuple(d.shape)} does not fit a weight of {tuple(weight.shape)}")
        return (d * layer.scale).reshape(weight.shape)

    def low_rank(self, layer) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B * scale, A) when the delta is exactly B @ A (merging ranks and SVD resizing need it), else None."""
        return None

    # ------------------------------------------------------------------------------------------ files
    def to_kohya(self, layer, where: str) -> dict[str, torch.Tensor]:
        """The layer's tensors under kohya/LyCORIS names, `alpha` included."""
        import torch

        out = {self.kohya_names[k]: v for k, v in layer.tensors.items()}
        dtype = next(iter(layer.tensors.values())).dtype
        out["alpha"] = torch.tensor(float(layer.alpha), dtype=dtype)
        return out

    def from_kohya(self, tensors: dict[str, torch.Tensor], alpha: float | None, where: str) -> dict[str, Any]:
        """Layer fields (tensors, alpha, rank, scale) from kohya-named tensors. The UIs' rule: scale = alpha /
        rank, alpha = rank when absent, and scale 1 when the tensors show no rank."""
        back = {v: k for k, v in self.kohya_names.items()}
        peft = {back[k]: v for k, v in tensors.items()}
        self.check(peft, where)
        rank = self.rank(peft)
        alpha = float(alpha) if alpha is not None else float(rank or 1)
        return {"tensors": peft, "alpha": alpha, "rank": rank or 0, "scale": alpha / rank if rank else 1.0}

    def kohya_network(self, conv: bool, rank: int, alpha: float) -> dict[str, str]:
        """`ss_network_module` / `ss_network_args` of kohya-format metadata (LyCORIS names the algorithm)."""
        args = {"algo": self.name, "conv_dim": str(rank), "conv_alpha": str(alpha)}
        return {"module": "lycoris.kohya", "args": args}

    def check(self, tensors: dict[str, Any], where: str) -> None:
        """Refuse a layer that lacks tensors its kind needs, naming them."""
        for group in self.required:
            if not any(all(n in tensors for n in alt) for alt in group):
                closest = min(group, key=lambda alt: sum(n not in tensors for n in alt))
                lacking = ", ".join(n for n in closest if n not in tensors)
                raise ModelError(f"{where}: {self.name} layer lacks {lacking} (a truncated or damaged file?)")
