"""What ComfyUI and AUTOMATIC1111 accept as kohya LoRA keys, re-derived for a given model from how their
loaders map names. Read from their sources, written here in our own words, and independent of finetune's own
name code (finetune/export/layouts.py), so a test can hold one against the other.

ComfyUI (comfy/lora.py `model_lora_keys_unet` / `model_lora_keys_clip`, comfy/utils.py `unet_to_diffusers`):
- U-Net: 'lora_unet_' + the original (LDM) module name of any weight, and 'lora_unet_' + the diffusers name of
  every weight its diffusers<->LDM map covers (resnets, attentions and their transformer blocks, samplers,
  conv_in/out, conv_norm_out, time and added embeddings), the map built from the U-Net config.
- CLIP: only the six projections of each encoder layer (mlp fc1/fc2, self-attention q/k/v/out), as
  'lora_te_text_model_encoder_layers_<i>_<name>' (also 'lora_te1_' for the first CLIP); SDXL's OpenCLIP-bigG
  as 'lora_te2_...', plus 'lora_te1_/lora_te2_text_projection'.
AUTOMATIC1111 (extensions-builtin/Lora/networks.py `convert_diffusers_name_to_compvis`, `load_network`):
- U-Net: diffusers names of resnets (conv1, conv2, time_emb_proj, conv_shortcut renamed), attentions,
  down/upsamplers, conv_in/out and the time embedding, converted with the block arithmetic of a real SD U-Net
  (3 slots per level, the first up level without attention); any other key is taken as an LDM name.
- CLIP (SD 1.x, SDXL's CLIP-L): 'lora_te_text_model_encoder_layers_*' / 'lora_te1_text_model_*' -> the HF CLIP
  module; OpenCLIP (SD 2.x, SDXL's bigG): encoder-layer names converted to open_clip's (fc1 -> c_fc,
  fc2 -> c_proj, self_attn -> attn); q/k/v/out of a layer are applied to the fused attention only when all four
  are in the file.
"""

from __future__ import annotations

import re

COMFY_SUFFIXES = {
    "lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "dora_scale",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
}
A1111_SUFFIXES = COMFY_SUFFIXES | {"scale", "bias"}
CLIP_SIX = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.q_proj": "self_attn_q_proj",
            "self_attn.k_proj": "self_attn_k_proj", "self_attn.v_proj": "self_attn_v_proj",
            "self_attn.out_proj": "self_attn_out_proj"}
RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "norm1": "in_layers.0", "norm2": "out_layers.0",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
ATTENTION = ("proj_in", "proj_out", "norm")
BLOCK = ("norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
         "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
BASIC = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
         "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
         "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def flat(path: str) -> str:
    return path.replace(".", "_")


# ------------------------------------------------------------------------------------------------ U-Net
def unet_map(config: dict) -> dict[str, str]:
    """diffusers module path -> LDM module path for every weight of a diffusers U-Net config that ComfyUI's map
    covers (the same arithmetic: resnets per level, one more on the way up, samplers after each level)."""
    res = config["layers_per_block"]
    levels = len(config["block_out_channels"])
    depth = config.get("transformer_layers_per_block", 1)
    depth = list(depth) if isinstance(depth, list | tuple) else [depth] * levels
    down_attn = ["CrossAttn" in t for t in config["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    out = dict(BASIC)

    def attention(src: str, dst: str, n_blocks: int) -> None:
        out.update({f"{src}.{a}": f"{dst}.{a}" for a in ATTENTION})
        out.update({f"{src}.transformer_blocks.{t}.{b}": f"{dst}.transformer_blocks.{t}.{b}"
                    for t in range(n_blocks) for b in BLOCK})

    for x in range(levels):
        n = 1 + (res + 1) * x
        for i in range(res):
            out.update({f"down_blocks.{x}.resnets.{i}.{r}": f"input_blocks.{n}.0.{ldm}" for r, ldm in RESNET.items()})
            if down_attn[x]:
                attention(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1", depth[x])
            n += 1
        out[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
    attention("mid_block.attentions.0", "middle_block.1", depth[-1])
    for i, n in enumerate((0, 2)):
        out.update({f"mid_block.resnets.{i}.{r}": f"middle_block.{n}.{ldm}" for r, ldm in RESNET.items()})
    up_depth = depth[::-1]
    for x in range(levels):
        n = (res + 1) * x
        for i in range(res + 1):
            out.update({f"up_blocks.{x}.resnets.{i}.{r}": f"output_blocks.{n}.0.{ldm}" for r, ldm in RESNET.items()})
            slot = 1
            if up_attn[x]:
                attention(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1", up_depth[x])
                slot = 2
            if i == res:
                out[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{n}.{slot}.conv"
            n += 1
    return out


def model_unet_map(unet) -> dict[str, str]:
    """`unet_map` restricted to the modules this U-Net has (ComfyUI patches only weights that exist)."""
    # (a U-Net carrying peft adapters keeps each original weight under '<module>.base_layer')
    weights = {k.removesuffix(".weight").replace(".base_layer", "") for k in unet.state_dict() if k.endswith(".weight")}
    return {d: ldm for d, ldm in unet_map(dict(unet.config)).items() if d in weights}


def comfy_unet_stems(unet) -> set[str]:
    m = model_unet_map(unet)
    return {f"lora_unet_{flat(p)}" for p in list(m) + list(m.values())}


A1111_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
                "conv_shortcut": "skip_connection"}


def a1111_unet_name(stem: str) -> str:
    """A1111's conversion of a kohya U-Net stem to its LDM module name (3 slots per level, as it assumes)."""
    rules = [
        (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[1]}"),
        (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[1]}"),
        (r"lora_unet_time_embedding_linear_(\d+)(.*)", lambda m: f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"),
        (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_"
                   f"{_a1111_suffix(m[2], m[4])}"),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_"
                   f"{_a1111_suffix(m[1], m[3])}"),
        (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_"
                   f"{_a1111_suffix(m[2], m[4])}"),
        (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", lambda m: f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"),
        (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
         lambda m: f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"),
    ]
    for pattern, make in rules:
        if m := re.match(pattern, stem):
            return make(m)
    return stem


def _a1111_suffix(part: str, rest: str) -> str:
    return A1111_RESNET.get(rest, rest) if part == "resnets" else rest


def a1111_unet_modules(unet) -> set[str]:
    """A1111's names of the U-Net's modules (its `network_layer_mapping`, LDM names with '_')."""
    return {f"diffusion_model_{flat(ldm)}" for ldm in model_unet_map(unet).values()}


def a1111_unet_accepts(stem: str, modules: set[str]) -> bool:
    return a1111_unet_name(stem) in modules or stem.replace("lora_unet", "diffusion_model") in modules


# ------------------------------------------------------------------------------------------------- CLIP
def comfy_clip_stems(family: str, layers: dict[str, int]) -> set[str]:
    """`layers`: text encoder name -> its number of encoder layers."""
    def six(prefixes, n):
        return {f"{p}_text_model_encoder_layers_{b}_{c}" for p in prefixes for b in range(n) for c in CLIP_SIX.values()}

    if family == "sdxl":
        return (six(("lora_te", "lora_te1"), layers["text_encoder"]) | six(("lora_te2",), layers["text_encoder_2"])
                | {"lora_te1_text_projection", "lora_te2_text_projection"})
    return six(("lora_te", "lora_te1"), layers["text_encoder"])


def hf_clip_modules(encoder) -> set[str]:
    names = {p for p, _ in encoder.named_modules() if p}
    return {p if p.startswith("text_model.") else f"text_model.{p}" for p in names} - {"text_model.text_model"}


def openclip_modules(n_layers: int, prefix: str) -> set[str]:
    parts = ("attn", "attn_out_proj", "ln_1", "ln_2", "mlp", "mlp_c_fc", "mlp_c_proj")
    return {f"{prefix}model_transformer_resblocks_{i}_{p}" for i in range(n_layers) for p in parts}


def _openclip_name(i: str, rest: str, prefix: str) -> str:
    if "mlp_fc1" in rest:
        return f"{prefix}model_transformer_resblocks_{i}_{rest.replace('mlp_fc1', 'mlp_c_fc')}"
    if "mlp_fc2" in rest:
        return f"{prefix}model_transformer_resblocks_{i}_{rest.replace('mlp_fc2', 'mlp_c_proj')}"
    return f"{prefix}model_transformer_resblocks_{i}_{rest.replace('self_attn', 'attn')}"


OPENCLIP = {"sd2": ("lora_te", "text_encoder", ""), "sdxl": ("lora_te2", "text_encoder_2", "1_")}


def a1111_clip_modules(family: str, encoders: dict) -> dict[str, set[str]]:
    """A1111's names of the text encoders' modules: HF CLIP ('[0_]transformer_text_model_...') and open_clip
    ('[1_]model_transformer_resblocks_...')."""
    out = {}
    if family in OPENCLIP:
        _, name, tag = OPENCLIP[family]
        out["openclip"] = openclip_modules(encoders[name].config.num_hidden_layers, tag)
    if family != "sd2":
        tag = "0_" if family == "sdxl" else ""
        out["clip"] = {f"{tag}transformer_{flat(p)}" for p in hf_clip_modules(encoders["text_encoder"])}
    return out


def a1111_clip_accepts(family: str, stem: str, stems: set[str], modules: dict[str, set[str]]) -> bool:
    """Whether A1111 applies the text-encoder module `stem` of a file holding `stems`."""
    if family in OPENCLIP and stem.startswith(OPENCLIP[family][0] + "_"):
        prefix, _, tag = OPENCLIP[family]
        m = re.match(rf"{prefix}_text_model_encoder_layers_(\d+)_(.+)", stem)
        if not m:
            return False
        modules = modules["openclip"]
        key = _openclip_name(m[1], m[2], tag)
        if key in modules and not key.endswith("attn_out_proj"):
            return True
        x = re.match(r"(.*)_([qkv]_proj|out_proj)$", key)  # the fused attention needs all four in the file
        whole = {f"{prefix}_text_model_encoder_layers_{m[1]}_self_attn_{p}" for p in ("q_proj", "k_proj", "v_proj",
                                                                                      "out_proj")}
        return bool(x) and x[1].endswith("attn") and x[1] in modules and whole <= stems
    tag = "0_" if family == "sdxl" else ""
    modules = modules.get("clip", set())
    if m := re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", stem):
        return family != "sdxl" and f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}" in modules
    if stem.startswith("lora_te1_text_model"):
        rest = stem.removeprefix("lora_te1_text_model")
        return f"{tag}transformer_text_model{rest}" in modules
    return False
