"""How model modules are named outside diffusers: in kohya/LyCORIS LoRA keys and in original checkpoints.

A family lists, per trained component, a `ModuleNames` (its `kohya_names`): the key prefix and how a diffusers
module path is spelled after it. The kohya writer and reader only call `key` and `path_of`, so a new family
(SD3, FLUX: BFL names) brings its own `ModuleNames` subclass without touching the export core.

What the UIs accept, read from their loaders:
- U-Net: ComfyUI maps `lora_unet_` + the original (LDM) module name and + the diffusers name for every U-Net
  weight; AUTOMATIC1111 converts diffusers names of resnets, attentions, samplers, conv_in/out and the time
  embedding with the SD block arithmetic (3 slots per level), and takes LDM names as they are. kohya writes
  diffusers names for SD 1/2 and LDM names for SDXL; we do the same (SDXL's `add_embedding` and an upsampler
  after an attention level have no diffusers spelling A1111 converts).
- CLIP text encoders: `lora_te_` (SD 1/2; `lora_te1_` is accepted too) or `lora_te1_` / `lora_te2_` (SDXL)
  + the transformers module path *with* its `text_model.` level, which transformers >= 5.6 dropped from
  `CLIPTextModel` (not from `CLIPTextModelWithProjection`).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any

from finetune.errors import ModelError

# ------------------------------------------------------------------------------------ LDM U-Net names
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
            "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
UNET_TOP_BACK = {v: k for k, v in UNET_TOP.items() if not k.startswith("class_")}
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
UNET_RESNET_BACK = {v: k for k, v in UNET_RESNET.items()}
LDM_TOPS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out")


@dataclass(frozen=True)
class UNetGeometry:
    """What the LDM block arithmetic needs of a U-Net config."""

    layers_per_block: int = 2
    #: per up block: does it hold attention (the upsampler then sits in slot 2, else 1)
    up_attention: tuple[bool, ...] = ()

    @classmethod
    def of(cls, unet) -> UNetGeometry:
        cfg = unet.config
        return cls(int(cfg.layers_per_block), tuple("CrossAttn" in t for t in cfg.up_block_types))

    def as_dict(self) -> dict[str, Any]:
        return {"layers_per_block": self.layers_per_block, "up_attention": list(self.up_attention)}


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return _join(UNET_RESNET.get(head, head), tail)


def unet_to_ldm(path: str, g: UNetGeometry) -> str:
    """A diffusers U-Net module path or weight key ('down_blocks.1.attentions.0.proj_in[.weight]') in the
    LDM layout ('input_blocks.4.1.proj_in[.weight]' for layers_per_block 2)."""
    for old, new in UNET_TOP.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old):]
    layers, per = g.layers_per_block, g.layers_per_block + 1
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", path):
        i, part, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if part == "downsamplers":
            return _join(f"input_blocks.{per * (i + 1)}.0.op", rest.removeprefix("conv").lstrip("."))
        idx = per * i + j + 1
        return f"input_blocks.{idx}.0.{_resnet(rest)}" if part == "resnets" else f"input_blocks.{idx}.1.{rest}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path):
        part, j, rest = m[1], int(m[2]), m[3]
        return f"middle_block.{2 * j}.{_resnet(rest)}" if part == "resnets" else f"middle_block.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", path):
        i, part, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if part == "upsamplers":
            attn = g.up_attention[i] if i < len(g.up_attention) else True
            return f"output_blocks.{per * i + layers}.{2 if attn else 1}.{rest}"
        idx = per * i + j
        return f"output_blocks.{idx}.0.{_resnet(rest)}" if part == "resnets" else f"output_blocks.{idx}.1.{rest}"
    raise ModelError(f"U-Net module '{path}' has no place in the original (LDM) layout")


def ldm_to_unet(path: str, layers_per_block: int) -> str | None:
    """The inverse of `unet_to_ldm` (None for a name outside the layout). Only the slot count per level is
    needed: an upsampler is the one module called 'conv' in an output block's slot 1 or 2."""
    for old, new in UNET_TOP_BACK.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old):]
    per = layers_per_block + 1
    if m := re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.(.+)", path):
        n, slot, rest = int(m[1]), int(m[2]), m[3]
        if n % per == 0:
            return _join(f"down_blocks.{n // per - 1}.downsamplers.0.conv", rest.removeprefix("op").lstrip("."))
        i, j = divmod(n - 1, per)
        return _ldm_block("down_blocks", i, j, slot, rest)
    if m := re.fullmatch(r"middle_block\.([012])\.(.+)", path):
        slot, rest = int(m[1]), m[2]
        return _ldm_block("mid_block", None, slot // 2, 0 if slot != 1 else 1, rest)
    if m := re.fullmatch(r"output_blocks\.(\d+)\.(\d+)\.(.+)", path):
        (i, j), slot, rest = divmod(int(m[1]), per), int(m[2]), m[3]
        if slot == 2 or (slot == 1 and rest.split(".")[0] == "conv"):
            return f"up_blocks.{i}.upsamplers.0.{rest}"
        return _ldm_block("up_blocks", i, j, slot, rest)
    return None


def _ldm_block(block: str, i: int | None, j: int, slot: int, rest: str) -> str | None:
    head = block if i is None else f"{block}.{i}"
    if slot == 0:
        first, _, tail = rest.partition(".")
        for ldm, name in UNET_RESNET_BACK.items():  # 'in_layers.2' spans two path parts
            if rest == ldm or rest.startswith(ldm + "."):
                return _join(f"{head}.resnets.{j}.{name}", rest[len(ldm) + 1:])
        return _join(f"{head}.resnets.{j}.{first}", tail)
    return f"{head}.attentions.{j}.{rest}" if slot == 1 else None


# --------------------------------------------------------------------------------------- kohya names
DIFFUSERS_WORDS = (
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out", "proj_in",
    "proj_out", "conv_shortcut", "time_emb_proj", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
    "linear_1", "linear_2", "add_embedding", "add_time_proj", "class_embedding",
)
LDM_WORDS = ("input_blocks", "output_blocks", "middle_block", "in_layers", "out_layers", "emb_layers",
             "skip_connection", "time_embed", "label_emb", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
             "proj_in", "proj_out")
CLIP_WORDS = ("text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "layer_norm1", "layer_norm2",
              "final_layer_norm", "text_projection", "token_embedding", "position_embedding")


def unflatten(stem: str, words) -> str:
    """'down_blocks_0_attentions_0_proj_in' -> 'down_blocks.0.attentions.0.proj_in': '_' joins path parts
    and also sits inside names, so names that contain '_' are matched first (longest first)."""
    compounds = sorted(set(words), key=lambda s: -s.count("_"))
    parts, pieces, i = [], stem.split("_"), 0
    while i < len(pieces):
        for word in compounds:
            n = word.count("_") + 1
            if "_".join(pieces[i:i + n]) == word:
                parts.append(word)
                i += n
                break
        else:
            parts.append(pieces[i])
            i += 1
    return ".".join(parts)


# compound words of diffusers transformer module names (SD3 MMDiT, FLUX), longest first where it matters
TRANSFORMER_WORDS = (
    "single_transformer_blocks", "transformer_blocks", "to_q", "to_k", "to_v", "to_out", "add_q_proj",
    "add_k_proj", "add_v_proj", "to_add_out", "ff_context", "proj_mlp", "proj_out", "norm1_context",
    "context_embedder", "x_embedder", "time_text_embed", "norm_out", "q_proj", "k_proj", "v_proj", "out_proj",
)


@dataclass(frozen=True)
class ModuleNames:
    """One component's kohya/LyCORIS key spelling: '<prefix>_<UI module path with '_'>'."""

    prefix: str
    #: more prefixes the UIs accept for this component (read, never written)
    also: tuple[str, ...] = ()
    words: tuple[str, ...] = ()

    @property
    def prefixes(self) -> tuple[str, ...]:
        return (self.prefix, *self.also)

    def to_ui(self, path: str) -> str:
        """The module path the UIs name (dotted)."""
        return path

    def from_ui(self, dotted: str) -> str | None:
        """The module path a UI name stands for (None: not a module of this component)."""
        return dotted

    def canonical(self, path: str) -> str:
        """One spelling per module, whatever library version wrote the file."""
        return path

    def runtime(self, path: str) -> str:
        """The module's path in the model as the installed libraries build it (what peft configs and
        diffusers-format files must name)."""
        return path

    def locate(self, module, path: str):
        """The submodule `path` names in `module` (AttributeError when there is none)."""
        return module.get_submodule(path)

    def bind(self, module=None, meta: dict[str, str] | None = None) -> ModuleNames:
        """These names fitted to one model (or to the layout a file's header records)."""
        return self

    def layout(self) -> dict[str, Any]:
        """What a file must record for `bind(meta=...)` to rebuild these names."""
        return {}

    def key(self, path: str) -> str:
        return f"{self.prefix}_{self.to_ui(path).replace('.', '_')}"

    def path_of(self, stem: str) -> str | None:
        """The module path of a key stem ('lora_unet_down_blocks_0_...'); None when it is not ours."""
        for p in sorted(self.prefixes, key=len, reverse=True):
            if stem.startswith(p + "_"):
                return self.from_ui(unflatten(stem[len(p) + 1:], self.words))
        return None


@functools.cache
def clip_is_flat() -> bool:
    """transformers >= 5.6 builds CLIPTextModel without its `text_model.` level (CLIPTextModelWithProjection
    keeps it)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                             num_attention_heads=1, max_position_embeddings=4))
    return not hasattr(model, "text_model")


@dataclass(frozen=True)
class ClipNames(ModuleNames):
    """A transformers CLIP text encoder; UI names keep the `text_model.` level. `wrapped`: the model class
    always has that level (CLIPTextModelWithProjection); else it depends on the transformers version."""

    words: tuple[str, ...] = CLIP_WORDS
    wrapped: bool = False

    def to_ui(self, path: str) -> str:
        return path if path.startswith("text_model.") or path == "text_projection" else f"text_model.{path}"

    def canonical(self, path: str) -> str:
        return self.to_ui(path)

    def runtime(self, path: str) -> str:
        path = self.canonical(path)
        return path.removeprefix("text_model.") if not self.wrapped and clip_is_flat() else path

    def locate(self, module, path: str):
        try:
            return module.get_submodule(path)
        except AttributeError:
            if not path.startswith("text_model."):
                raise
            return module.get_submodule(path.removeprefix("text_model."))  # a flattened CLIPTextModel


LAYOUT_KEY = "finetune.unet_layout"


@dataclass(frozen=True)
class UNetNames(ModuleNames):
    """A diffusers U-Net written with diffusers names (`style='diffusers'`, SD 1/2 as kohya does) or LDM
    names (`style='ldm'`, SDXL as kohya does); either spelling is read back."""

    style: str = "diffusers"
    geometry: UNetGeometry = field(default_factory=UNetGeometry)
    words: tuple[str, ...] = DIFFUSERS_WORDS + LDM_WORDS

    def to_ui(self, path: str) -> str:
        return unet_to_ldm(path, self.geometry) if self.style == "ldm" else path

    def from_ui(self, dotted: str) -> str | None:
        if dotted.split(".")[0] in LDM_TOPS:
            return ldm_to_unet(dotted, self.geometry.layers_per_block)
        return dotted

    def bind(self, module=None, meta=None) -> UNetNames:
        import json
        from dataclasses import replace

        if module is not None and hasattr(getattr(module, "config", None), "layers_per_block"):
            return replace(self, geometry=UNetGeometry.of(module))
        if meta and LAYOUT_KEY in meta:
            try:
                g = json.loads(meta[LAYOUT_KEY])
                return replace(self, geometry=UNetGeometry(int(g["layers_per_block"]), tuple(g["up_attention"])))
            except (ValueError, KeyError, TypeError):
                raise ModelError(f"header key {LAYOUT_KEY} is not readable: {meta[LAYOUT_KEY]!r}") from None
        return self

    def layout(self) -> dict[str, Any]:
        return self.geometry.as_dict()


def bound_names(names: dict[str, ModuleNames], modules: dict | None = None,
                meta: dict[str, str] | None = None) -> dict[str, ModuleNames]:
    """Every component's names fitted to the model's modules, or else to what the file header records."""
    modules = modules or {}
    return {c: n.bind(modules.get(c), meta) for c, n in names.items()}
