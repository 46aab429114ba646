"""FLUX's original (Black Forest Labs) layout: the key table between diffusers' module names and BFL's, and
the LoRA form sd-scripts and Forge read (`lora_unet_double_blocks_0_img_attn_qkv`, ...).

BFL fuses what diffusers keeps apart: a double block's q, k and v into one `qkv` linear per stream, and a
single block's q, k, v and MLP input into `linear1`. A LoRA on the fused weight is written exactly:

    down = [down_q; down_k; down_v]          (rank r_q + r_k + r_v, stacked)
    up   = block-diagonal(up_q, up_k, up_v)  (each part's rows, its own columns)

so up @ down restricted to q's rows is up_q @ down_q, and nothing leaks between parts. The fused rank grows
(3r for q/k/v, 4r for linear1 with the MLP), and alpha grows with it so that alpha / rank keeps each part's
scale. Reading goes the other way and is exact for any fused LoRA: a part's rows of `up` with the columns
they use. Only plain LoRA fuses like this; LoHa, LoKr and DoRA are refused in one line (their ComfyUI form
`lora_transformer_*` names diffusers' modules directly and needs no fusion).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from finetune.errors import ModelError

PREFIX = "lora_unet"


@dataclass(frozen=True)
class Part:
    module: str  # diffusers module path inside the transformer
    offset: int  # first output row of this part in the fused BFL weight
    rows: int


FORMAT = "bfl"  # the export format name (export.formats, tools/convert.py --to)


def geometry_of_model(config: dict) -> dict:
    return {"inner_dim": config["num_attention_heads"] * config["attention_head_dim"],
            "num_layers": config["num_layers"], "num_single_layers": config["num_single_layers"]}


def bfl_table(config: dict) -> dict[str, list[Part]]:
    """BFL linear weight name (without '.weight') -> the diffusers modules it holds, in row order.
    `config`: inner_dim, num_layers, num_single_layers (see geometry_of_model / geometry_of_layers)."""
    d = config["inner_dim"]
    mlp = int(d * 4.0)
    table: dict[str, list[Part]] = {}

    def one(bfl: str, module: str, rows: int) -> None:
        table[bfl] = [Part(module, 0, rows)]

    for i in range(config["num_layers"]):
        b, t = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        table[b + "img_attn.qkv"] = [Part(t + f"attn.to_{x}", j * d, d) for j, x in enumerate("qkv")]
        table[b + "txt_attn.qkv"] = [Part(t + f"attn.add_{x}_proj", j * d, d) for j, x in enumerate("qkv")]
        one(b + "img_attn.proj", t + "attn.to_out.0", d)
        one(b + "txt_attn.proj", t + "attn.to_add_out", d)
        one(b + "img_mlp.0", t + "ff.net.0.proj", mlp)
        one(b + "img_mlp.2", t + "ff.net.2", d)
        one(b + "txt_mlp.0", t + "ff_context.net.0.proj", mlp)
        one(b + "txt_mlp.2", t + "ff_context.net.2", d)
        one(b + "img_mod.lin", t + "norm1.linear", 6 * d)
        one(b + "txt_mod.lin", t + "norm1_context.linear", 6 * d)
    for i in range(config["num_single_layers"]):
        b, t = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        table[b + "linear1"] = [*(Part(t + f"attn.to_{x}", j * d, d) for j, x in enumerate("qkv")),
                                Part(t + "proj_mlp", 3 * d, mlp)]
        one(b + "linear2", t + "proj_out", d)
        one(b + "modulation.lin", t + "norm.linear", 3 * d)
    return table


def owner(config: dict) -> dict[str, tuple[str, Part]]:
    """diffusers module path -> (BFL weight name, its part)."""
    return {p.module: (bfl, p) for bfl, parts in bfl_table(config).items() for p in parts}


def stem(bfl: str) -> str:
    return f"{PREFIX}_{bfl.replace('.', '_')}"


# inputs of each diffusers module, in units of the inner width d (to find d from an adapter's own tensors)
_IN_UNITS = {"ff.net.2": 4, "ff_context.net.2": 4, "proj_out": 5}


def geometry_of_layers(modules: dict[str, int]) -> dict:
    """inner_dim and block counts from {diffusers module path: its input features} (an adapter's lora_A)."""
    dims, double, single = set(), 0, 0
    for module, features in modules.items():
        parts = module.split(".")
        if parts[0] == "transformer_blocks":
            double = max(double, int(parts[1]) + 1)
        elif parts[0] == "single_transformer_blocks":
            single = max(single, int(parts[1]) + 1)
        else:
            continue
        tail = ".".join(parts[2:])
        dims.add(features // _IN_UNITS.get(tail, 1))
    if len(dims) != 1:
        raise ModelError(f"cannot tell FLUX's inner width from this adapter (found {sorted(dims) or 'none'})")
    return {"inner_dim": dims.pop(), "num_layers": double, "num_single_layers": single}


def geometry_of_bfl(tensors: dict[str, torch.Tensor]) -> dict:
    """inner_dim and block counts from BFL-named LoRA tensors."""
    double = single = 0
    dims = set()
    for key, value in tensors.items():
        s = key.split(".")[0]
        for kind in ("double_blocks", "single_blocks"):
            head = f"{PREFIX}_{kind}_"
            if s.startswith(head):
                index = int(s[len(head):].split("_")[0])
                if kind == "double_blocks":
                    double = max(double, index + 1)
                else:
                    single = max(single, index + 1)
                if key.endswith("lora_down.weight") and s.endswith(("_qkv", "_linear1", "_proj")):
                    dims.add(value.shape[1])
    if len(dims) != 1:
        raise ModelError(f"cannot tell FLUX's inner width from this file (found {sorted(dims) or 'none'})")
    return {"inner_dim": dims.pop(), "num_layers": double, "num_single_layers": single}


# ------------------------------------------------------------------------------------------- writing
def lora_to_bfl(layers: dict, config: dict, where: str) -> dict[str, torch.Tensor]:
    """'transformer.<module>' LoRA layers (finetune.export.layers.Layer) as fused BFL-named kohya tensors;
    `config` is the geometry (inner_dim, num_layers, num_single_layers)."""
    import torch

    owners = owner(config)
    grouped: dict[str, list[tuple[Part, object]]] = {}
    for name, layer in layers.items():
        component, module = name.split(".", 1)
        if component != "transformer":
            continue
        if layer.kind != "lora" or layer.dora:
            raise ModelError(f"{where}: the BFL form (sd-scripts, Forge) fuses q/k/v and holds plain LoRA only; "
                             f"'{module}' is {'DoRA' if layer.dora else layer.kind}: use the ComfyUI form "
                             "(kohya) or the diffusers file")
        if module not in owners:
            raise ModelError(f"{where}: '{module}' has no place in FLUX's BFL layout")
        bfl, part = owners[module]
        grouped.setdefault(bfl, []).append((part, layer))
    out: dict[str, torch.Tensor] = {}
    for bfl, parts in grouped.items():
        down, up, alpha = _fuse(sorted(parts, key=lambda pl: pl[0].offset), total=_rows(config, bfl))
        key = stem(bfl)
        out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = down, up
        out[f"{key}.alpha"] = torch.tensor(alpha)
    return out


def _rows(config: dict, bfl: str) -> int:
    parts = bfl_table(config)[bfl]
    return parts[-1].offset + parts[-1].rows


def _fuse(parts, total: int):
    """Stack the downs, place each up as a diagonal block; alpha keeps alpha / rank when the parts share a
    scale, else each part's scale is folded into its up and the fused scale is 1."""
    import torch

    scales = {layer.scale for _, layer in parts}
    shared = scales.pop() if len(scales) == 1 else None
    downs, ups = [], []
    for _, layer in parts:
        ups.append(layer.tensors["lora_B.weight"] * (1.0 if shared is not None else layer.scale))
        downs.append(layer.tensors["lora_A.weight"])
    rank = sum(d.shape[0] for d in downs)
    up = ups[0].new_zeros((total, rank))
    col = 0
    for (part, _), u in zip(parts, ups, strict=True):
        up[part.offset: part.offset + part.rows, col: col + u.shape[1]] = u
        col += u.shape[1]
    alpha = float((shared if shared is not None else 1.0) * rank)
    return torch.cat(downs, dim=0).contiguous(), up.contiguous(), alpha


# ------------------------------------------------------------------------------------------- reading
def is_bfl(tensors) -> bool:
    return any(k.startswith((f"{PREFIX}_double_blocks_", f"{PREFIX}_single_blocks_")) for k in tensors)


def bfl_to_lora(tensors: dict[str, torch.Tensor], config: dict, where: str) -> dict[str, dict]:
    """Fused BFL LoRA tensors -> {'transformer.<module>': {'down', 'up', 'alpha'}} per diffusers module,
    exact: each part takes its rows of `up` and the columns those rows use."""
    by_stem = {stem(bfl): (bfl, parts) for bfl, parts in bfl_table(config).items()}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        s, _, suffix = key.partition(".")
        if s.startswith(f"{PREFIX}_"):
            grouped.setdefault(s, {})[suffix] = value
    out: dict[str, dict] = {}
    for s, t in grouped.items():
        if s not in by_stem:
            raise ModelError(f"{where}: '{s}' names no linear of FLUX's BFL layout")
        if "lora_down.weight" not in t or "lora_up.weight" not in t:
            raise ModelError(f"{where}: '{s}' lacks lora_down/lora_up (not a plain LoRA, or a truncated file)")
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        rank = down.shape[0]
        scale = float(t["alpha"].item()) / rank if "alpha" in t else 1.0
        for part in by_stem[s][1]:
            rows = up[part.offset: part.offset + part.rows]
            used = rows.abs().sum(dim=0).nonzero().flatten()
            if used.numel() == 0:
                continue  # this part was not adapted
            lo, hi = int(used.min()), int(used.max()) + 1
            if int(used.numel()) != hi - lo:
                lo, hi = 0, rank  # a genuine fused LoRA: every part shares the whole rank
            out[f"transformer.{part.module}"] = {"down": down[lo:hi], "up": rows[:, lo:hi],
                                                 "alpha": scale * (hi - lo)}
    return out


RENAMES = {  # diffusers top-level module -> BFL name
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
}
NORMS = {  # diffusers qk-norm weight (in a block) -> BFL scale
    "double": {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
               "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"},
    "single": {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"},
}


def bfl_state_dict(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel state dict in BFL's original names (fused linears, qk-norm scales,
    the final modulation's (shift, scale) order): what FLUX single files hold, and what UIs' LoRA loaders
    name. tests/test_flux.py checks it against diffusers' own BFL -> diffusers converter."""
    import torch

    out = dict(state)
    for bfl, parts in bfl_table(config).items():
        for suffix in ("weight", "bias"):
            pieces = [out.pop(f"{p.module}.{suffix}") for p in parts if f"{p.module}.{suffix}" in out]
            if pieces:
                out[f"{bfl}.{suffix}"] = torch.cat(pieces, dim=0)
    for src, dst in RENAMES.items():
        for suffix in ("weight", "bias"):
            if f"{src}.{suffix}" in out:
                out[f"{dst}.{suffix}"] = out.pop(f"{src}.{suffix}")
    for kind, prefix, bprefix, n in (("double", "transformer_blocks", "double_blocks", config["num_layers"]),
                                     ("single", "single_transformer_blocks", "single_blocks",
                                      config["num_single_layers"])):
        for i in range(n):
            for src, dst in NORMS[kind].items():
                out[f"{bprefix}.{i}.{dst}.scale"] = out.pop(f"{prefix}.{i}.{src}.weight")
    for suffix in ("weight", "bias"):  # BFL's final modulation is (shift, scale); diffusers' (scale, shift)
        scale, shift = out.pop(f"norm_out.linear.{suffix}").chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{suffix}"] = torch.cat([shift, scale], dim=0)
    return out


# ---------------------------------------------------------------------- the layout API the export core calls
def detect(tensors) -> bool:
    return is_bfl(tensors)


def read(tensors: dict[str, torch.Tensor], names: dict, where) -> dict:
    """A BFL-named file -> adapter layers ('transformer.<diffusers module>', 'text_encoder.<path>')."""
    from finetune.export.kohya import kohya_layers
    from finetune.export.layers import Layer

    fused = {k: v for k, v in tensors.items() if k.startswith(f"{PREFIX}_")}
    layers = {}
    for name, p in bfl_to_lora(fused, geometry_of_bfl(fused), str(where)).items():
        rank = int(p["down"].shape[0])
        layers[name] = Layer("lora", {"lora_A.weight": p["down"].contiguous(), "lora_B.weight": p["up"].contiguous()},
                             alpha=float(p["alpha"]), rank=rank, scale=float(p["alpha"]) / rank)
    rest = {k: v for k, v in tensors.items() if k not in fused}
    if rest:  # the CLIP-L part keeps its kohya names (lora_te1_...)
        layers |= kohya_layers(rest, where, {c: n for c, n in names.items() if c != "transformer"})
    return layers


def write(layers: dict, names: dict, where: str) -> dict[str, torch.Tensor]:
    """Adapter layers -> BFL-named tensors (transformer, fused) + kohya-named text-encoder tensors."""
    from finetune.export.kohya import layers_to_kohya

    mine = {n: layer for n, layer in layers.items() if n.startswith("transformer.")}
    geometry = geometry_of_layers({n.split(".", 1)[1]: int(layer.tensors["lora_A.weight"].shape[1])
                                   for n, layer in mine.items() if "lora_A.weight" in layer.tensors}) if mine else {}
    out = lora_to_bfl(mine, geometry, where) if mine else {}
    rest = {n: layer for n, layer in layers.items() if n not in mine}
    if rest:
        out |= layers_to_kohya(rest, {c: n for c, n in names.items() if c != "transformer"}, where)
    return out
