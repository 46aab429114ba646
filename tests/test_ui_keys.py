"""Full kohya key names against the names ComfyUI and AUTOMATIC1111 map (tests/ui_tables.py, re-derived from
their loaders), for sd1, sd2 and sdxl, U-Net and text encoders, every adapter kind; and the readers
(tools/merge.py, tools/convert.py) take files written with those standard names."""

from __future__ import annotations

import functools

import pytest
import torch

from finetune.export.kohya import kohya_layers, layers_to_kohya
from finetune.export.layers import Layer
from finetune.export.layouts import bound_names
from finetune.export.lora import export_lora
from finetune.models.families import FAMILIES
from tests import ui_tables as ui
from tests.helpers import adapted, count_adapted, make_ctx

UNET_LOCON = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
              "conv1", "conv2", "conv_shortcut", "time_emb_proj"]
# tensors of one layer of each kind (names are what the test is about; shapes do not matter here)
EXAMPLES = {
    "lora": {"lora_A.weight": torch.zeros(1, 1), "lora_B.weight": torch.zeros(1, 1)},
    "loha": {k: torch.zeros(1, 1) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")},
    "lokr": {"lokr_w1": torch.zeros(1, 1), "lokr_w2_a": torch.zeros(1, 1), "lokr_w2_b": torch.zeros(1, 1)},
}
CLIP_SIX = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@functools.cache
def real_modules(family: str) -> dict[str, torch.nn.Module]:
    """The real SD 1.5 / SD 2.1 / SDXL U-Net and text encoders, built on the meta device (names, no weights)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from finetune.models import reference as r

    unets = {"sd1": r.SD15_UNET, "sd2": r.SD21_UNET, "sdxl": r.SDXL_UNET}
    texts = {"sd1": {"text_encoder": (CLIPTextModel, r.CLIP_L)}, "sd2": {"text_encoder": (CLIPTextModel, r.OPENCLIP_H)},
             "sdxl": {"text_encoder": (CLIPTextModel, r.CLIP_L),
                      "text_encoder_2": (CLIPTextModelWithProjection, r.OPENCLIP_BIGG)}}
    with torch.device("meta"):
        modules = {"unet": UNet2DConditionModel(**unets[family])}
        modules |= {name: cls(CLIPTextConfig(**cfg)) for name, (cls, cfg) in texts[family].items()}
    return modules


def targeted(module: torch.nn.Module, targets) -> list[str]:
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    config = LoraConfig(target_modules=list(targets)) if targets else None
    return [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
            and (config is None or check_target_module_exists(config, n))]


def check_against_uis(family: str, keys: dict, modules: dict, a1111: bool = True) -> None:
    stems = {k.split(".")[0] for k in keys}
    suffixes = {k.split(".", 1)[1] for k in keys}
    assert suffixes <= ui.COMFY_SUFFIXES and suffixes <= ui.A1111_SUFFIXES, suffixes
    encoders = {n: modules[n] for n in FAMILIES[family].text_encoder_names}
    comfy = ui.comfy_unet_stems(modules["unet"]) | ui.comfy_clip_stems(
        family, {n: e.config.num_hidden_layers for n, e in encoders.items()})
    assert sorted(stems - comfy) == [], "ComfyUI would not load these"
    if a1111:
        unet_names, clip_names = ui.a1111_unet_modules(modules["unet"]), ui.a1111_clip_modules(family, encoders)
        refused = [s for s in stems if not (ui.a1111_unet_accepts(s, unet_names) if s.startswith("lora_unet_")
                                             else ui.a1111_clip_accepts(family, s, stems, clip_names))]
        assert refused == [], "AUTOMATIC1111 would not apply these"


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_every_module_of_real_models_gets_a_ui_name(family, kind):
    """Every Linear/Conv2d of the real U-Net, and the six projections of every CLIP layer, named for the UIs."""
    modules = real_modules(family)
    f = FAMILIES[family]
    layers = {f"unet.{p}": Layer(kind, dict(EXAMPLES[kind]), 1.0, 1, 1.0) for p in targeted(modules["unet"], None)}
    for name in f.text_encoder_names:
        layers |= {f"{name}.{f.kohya_names[name].canonical(p)}": Layer(kind, dict(EXAMPLES[kind]), 1.0, 1, 1.0)
                   for p in targeted(modules[name], CLIP_SIX)}
    names = bound_names(f.kohya_names, modules)
    keys = layers_to_kohya(layers, names)
    assert len({k.split(".")[0] for k in keys}) == len(layers) > 300
    check_against_uis(family, keys, modules)
    assert set(kohya_layers(keys, "roundtrip", names)) == set(layers)  # and read back to the same modules
    stems = {k.split(".")[0] for k in keys}
    expected = {  # what kohya-trained files of these models are known to hold
        "sd1": ["lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                "lora_unet_up_blocks_3_resnets_2_conv_shortcut"],
        "sd2": ["lora_te_text_model_encoder_layers_22_mlp_fc2", "lora_unet_mid_block_attentions_0_proj_out"],
        "sdxl": ["lora_te1_text_model_encoder_layers_11_self_attn_out_proj",
                 "lora_te2_text_model_encoder_layers_31_mlp_fc1",
                 "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k",
                 "lora_unet_output_blocks_2_2_conv", "lora_unet_label_emb_0_0", "lora_unet_middle_block_2_emb_layers_1"],
    }[family]
    assert set(expected) <= stems


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_kohya_exports_hold_only_ui_names(request, family, kind):
    """A real export (peft adapters on a tiny base, LoCon targets, U-Net and every text encoder): every key is
    one ComfyUI maps for that model (A1111's arithmetic assumes real SD block counts: checked above)."""
    base = request.getfixturevalue({"sd1": "tiny_base", "sd2": "tiny_sd2_base", "sdxl": "tiny_sdxl_base"}[family])
    comps, method = adapted(base, adapter=kind, targets=UNET_LOCON)
    out = request.getfixturevalue("tmp_path")
    export_lora(comps, method, out, make_ctx(formats=("kohya",)))
    from finetune.export.io import read_tensors

    keys, _ = read_tensors(out / "tiny.safetensors")
    modules = comps.named_modules()
    check_against_uis(family, keys, modules, a1111=False)
    n_layers = sum(count_adapted(modules[c]) for c in ["unet", *comps.family.text_encoder_names])
    assert len({k.split(".")[0] for k in keys}) == n_layers > 60


def _standard_file(path, pairs: dict[str, tuple[int, int]], rank: int = 2, alpha: float = 1.0):
    """A LoRA file as another trainer writes it: standard UI stems -> (out, in) of the module."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    tensors = {}
    for stem, (n_out, n_in) in pairs.items():
        tensors[f"{stem}.lora_down.weight"] = torch.randn(rank, n_in, generator=g) * 0.3
        tensors[f"{stem}.lora_up.weight"] = torch.randn(n_out, rank, generator=g) * 0.3
        tensors[f"{stem}.alpha"] = torch.tensor(alpha)
    save_file(tensors, path)
    return tensors


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_merge_and_convert_read_files_with_standard_names(request, tmp_path, family):
    """Stems taken from the UI tables (not from our writer): fuse adds alpha/rank * up @ down to exactly those
    modules, and convert turns the file into a diffusers LoRA naming the same modules."""
    from finetune.export.adapters import read_adapter
    from tests.helpers import load_comps
    from tests.test_tools_export import run_tool

    base = request.getfixturevalue("tiny_base" if family == "sd1" else "tiny_sdxl_base")
    comps = load_comps(base)
    unet_map = ui.model_unet_map(comps.unet)
    attn = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    te, te_path = ("lora_te", "encoder.layers.0.self_attn.q_proj") if family == "sd1" else \
        ("lora_te2", "text_model.encoder.layers.1.mlp.fc1")
    te_name = "text_encoder" if family == "sd1" else "text_encoder_2"
    unet_stem = "lora_unet_" + ui.flat(attn if family == "sd1" else unet_map[attn])  # kohya: LDM names for SDXL
    te_stem = f"{te}_text_model_{ui.flat(te_path.removeprefix('text_model.'))}"
    te_module = comps.named_modules()[te_name].get_submodule(te_path)
    unet_module = comps.unet.get_submodule(attn)
    file = tmp_path / "theirs.safetensors"
    t = _standard_file(file, {unet_stem: tuple(unet_module.weight.shape), te_stem: tuple(te_module.weight.shape)})
    before = {n: m.weight.detach().clone() for n, m in (("u", unet_module), ("t", te_module))}
    fused = tmp_path / "fused"
    assert run_tool("merge", "fuse", "--base", base, "--lora", file, "--out", fused) == 0
    merged = load_comps(fused)
    for tag, module, stem in (("u", merged.unet.get_submodule(attn), unet_stem),
                              ("t", merged.named_modules()[te_name].get_submodule(te_path), te_stem)):
        want = before[tag] + 0.5 * t[f"{stem}.lora_up.weight"] @ t[f"{stem}.lora_down.weight"]  # alpha 1 / rank 2
        assert (module.weight - want).abs().max() < 1e-6, stem
    assert run_tool("convert", "lora", file, "--to", "diffusers", "--family", family, "--out", tmp_path / "d") == 0
    back = read_adapter(tmp_path / "d")
    canon = FAMILIES[family].kohya_names[te_name].canonical(te_path)
    # without a base, LDM names are read with the real SDXL block layout (the tiny base has fewer blocks)
    expected = {f"{te_name}.{canon}"} | ({f"unet.{attn}"} if family == "sd1" else set())
    assert expected <= set(back.layers) and len(back.layers) == 2
