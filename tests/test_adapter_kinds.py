"""Adapter kinds are objects registered by name (finetune/kinds): a new kind defined in this file alone trains,
exports (peft and kohya form), reads back, fuses and reloads; files that lack tensors are refused naming them;
rank_pattern / alpha_pattern are patterns as in peft; a file without adapter metadata says what it assumed."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from finetune.errors import ModelError
from finetune.export.adapters import fuse, read_adapter
from finetune.export.lora import export_lora, load_peft_adapter
from finetune.kinds import AdapterKind, get_kind, register_kind, unregister_kind
from tests.helpers import adapted, count_adapted, load_comps, make_ctx
from tests.helpers import fixed_unet_output as unet_out


class ToyIA3(AdapterKind):
    """IA3-like: one learned scale per output feature, W' = l * W (peft scales the bias too: this toy goes on
    modules without one). Everything the kind needs is here."""

    name = "toy_ia3"
    kohya_names = {"ia3_l": "weight"}  # the key AUTOMATIC1111's IA3 module reads
    required = ((("ia3_l",),),)
    alpha_key = None

    def peft_config(self, rank, alpha, targets, dropout=0.0, use_dora=False):
        from peft import IA3Config

        return IA3Config(target_modules=targets, feedforward_modules=[])

    def rebuild_config(self, common, alpha, alpha_pattern, layers):
        from peft import IA3Config

        return IA3Config(target_modules=common["target_modules"], feedforward_modules=[])

    def delta(self, layer, weight):
        scale = layer.tensors["ia3_l"].float().reshape(-1, *([1] * (weight.dim() - 1)))
        return weight.float() * (scale - 1)


@pytest.fixture
def toy_kind():
    register_kind(ToyIA3)
    yield get_kind("toy_ia3")
    unregister_kind("toy_ia3")


def out_of(comps) -> torch.Tensor:
    return unet_out(comps.unet, comps.text_encoder, comps.tokenizer)


def test_a_kind_in_one_file_trains_exports_reads_and_fuses(tiny_base, tmp_path, toy_kind):
    from finetune.export.convert import convert_lora
    from finetune.methods.lora import LoRAConfig

    assert LoRAConfig(adapter="toy_ia3").adapter == "toy_ia3"  # the recipe accepts it once registered
    comps, method = adapted(tiny_base, adapter="toy_ia3", te=False, targets=["to_q", "to_k", "to_v"])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in comps.named_modules().values():
            for name, p in module.named_parameters():
                if "ia3_l" in name:
                    p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    ref = out_of(comps)
    written = export_lora(comps, method, tmp_path, make_ctx())
    assert {p.name for p in written} == {"peft_adapter.safetensors", "tiny.safetensors"}
    for source in (tmp_path, tmp_path / "tiny.safetensors"):
        adapter = read_adapter(source)
        assert adapter.kind == "toy_ia3" and len(adapter.layers) > 10
        base = load_comps(tiny_base)
        assert (out_of(base) - ref).abs().max() > 1e-3  # the adapter really changes the output
        fuse(adapter, base.named_modules())
        assert (out_of(base) - ref).abs().max() < 1e-4, source.name
    back = convert_lora(tmp_path / "tiny.safetensors", tmp_path / "conv" / "peft_adapter.safetensors", "diffusers")
    loaded = load_comps(tiny_base)
    load_peft_adapter(back, loaded.named_modules(), names=loaded.family.kohya_names)
    assert (out_of(loaded) - ref).abs().max() < 1e-4


def test_registry_refuses_duplicates_and_clashing_tensor_names(toy_kind):
    from finetune.methods.lora import LoRAConfig

    with pytest.raises(ValueError, match="registered twice"):
        register_kind(ToyIA3)

    class Clash(ToyIA3):
        name = "clash"
        kohya_names = {"lora_A.weight": "lora_down.weight"}

    with pytest.raises(ValueError, match="claims tensor names of 'lora'"):
        register_kind(Clash)
    with pytest.raises(ValueError, match="did you mean 'loha'"):
        LoRAConfig(adapter="lohaa")


def test_truncated_peft_file_is_refused_naming_the_missing_tensors(tiny_base, tmp_path):
    from safetensors.torch import load_file, save_file

    from finetune.export.io import read_metadata

    comps, method = adapted(tiny_base, adapter="loha", te=False, targets=["to_q", "to_v"])
    export_lora(comps, method, tmp_path, make_ctx(formats=("diffusers",)))
    full = tmp_path / "peft_adapter.safetensors"
    tensors, meta = load_file(full), read_metadata(full)
    dropped = sorted(tensors)[0]  # 'unet.<module>.hada_w1_a'
    del tensors[dropped]
    save_file(tensors, tmp_path / "cut.safetensors", metadata=meta)
    base = load_comps(tiny_base)
    layer, tensor = dropped.rsplit(".", 1)
    with pytest.raises(ModelError, match=rf"layer '{layer}': loha layer lacks {tensor} \(a truncated"):
        load_peft_adapter(tmp_path / "cut.safetensors", base.named_modules())
    assert count_adapted(base.unet) == 0  # refused before anything was injected
    # a whole layer gone from a kohya file: fuse checks the file against the targets its own header names
    export_lora(comps, method, tmp_path / "k", make_ctx(formats=("kohya",)))
    kohya = load_file(tmp_path / "k" / "tiny.safetensors")
    gone = sorted({k.split(".")[0] for k in kohya})[-1]
    save_file({k: v for k, v in kohya.items() if not k.startswith(gone + ".")}, tmp_path / "cut_k.safetensors",
              metadata=read_metadata(tmp_path / "k" / "tiny.safetensors"))
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    with pytest.raises(ModelError, match=r"1 layer\(s\) its config targets are missing \(unet\.up_blocks"):
        fuse(read_adapter(tmp_path / "cut_k.safetensors"), base.named_modules())
    assert all(torch.equal(v, base.unet.state_dict()[k]) for k, v in before.items())  # nothing changed


def test_rank_and_alpha_patterns_match_like_peft(tiny_base, tmp_path):
    """rank_pattern {'to_q': 2} and alpha_pattern {'to_k': 8} are patterns over every to_q / to_k (peft's
    rule); an exact-path lookup would scale them with the default rank and alpha."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from finetune.export.lora import save_diffusers_lora
    from tests.helpers import randomise

    comps = load_comps(tiny_base)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], rank_pattern={"to_q": 2},
                        alpha_pattern={"to_k": 8}, init_lora_weights="gaussian")
    inject_adapter_in_model(config, comps.unet)
    randomise(comps.unet, 2)
    ref = out_of(comps)
    tensors = {f"unet.{k}": v for k, v in get_peft_model_state_dict(comps.unet).items()}
    cfg = json.loads(json.dumps(config.to_dict(), default=sorted))
    save_diffusers_lora(tensors, {"unet": cfg}, tmp_path, {}, "lora")
    adapter = read_adapter(tmp_path)
    scales = {name.rsplit(".", 1)[-1]: layer.scale for name, layer in adapter.layers.items()}
    assert scales == {"to_q": 2.0, "to_k": 2.0, "to_v": 1.0}
    base = load_comps(tiny_base)
    fuse(adapter, base.named_modules())
    assert (out_of(base) - ref).abs().max() < 1e-4


def test_file_without_adapter_metadata_says_what_it_assumed(tiny_base, tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    comps, method = adapted(tiny_base, te=False, rank=4, alpha=4.0, targets=["to_q"])
    export_lora(comps, method, tmp_path, make_ctx(formats=("diffusers",)))
    save_file(load_file(tmp_path / "pytorch_lora_weights.safetensors"), tmp_path / "bare.safetensors")
    with caplog.at_level(logging.WARNING, logger="finetune.export"):
        adapter = read_adapter(tmp_path / "bare.safetensors")
    assert "no adapter config in its header: alpha taken as each layer's rank (scale 1)" in caplog.text
    assert {layer.scale for layer in adapter.layers.values()} == {1.0}


def test_dora_with_kohya_is_refused_at_recipe_time(tmp_path, images):
    """No run trains for an hour to end without the file it promised: DoRA + explicit kohya stops at load;
    by default a DoRA run writes every format that can hold it exactly."""
    from finetune.errors import RecipeError
    from finetune.recipe import load_recipe
    from tests.helpers import write_recipe

    recipe = write_recipe(tmp_path, "toy", images, method={"use_dora": True}, export={"formats": ["diffusers", "kohya"]})
    with pytest.raises(RecipeError, match=r"export.formats: 'kohya' cannot carry DoRA \(method.use_dora: true\)"):
        load_recipe(recipe)
    assert load_recipe(recipe, ["export.formats=null"]).export.formats == ["diffusers"]
    assert load_recipe(recipe, ["method.use_dora=false"]).export.formats == ["diffusers", "kohya"]
    import yaml

    data = yaml.safe_load(recipe.read_text())
    data["export"]["formats"] = None
    data["method"] = {"name": "pivotal", "embedding": {"token": "<sks>", "initializer": "circle"},
                      "lora": {"use_dora": True}}
    recipe.write_text(yaml.safe_dump(data))
    assert load_recipe(recipe).export.formats == ["diffusers", "a1111"]
