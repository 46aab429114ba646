"""What exported files say about themselves, and what they must not: SD 2.x labels (ss_v2, modelspec by
prediction type), real tag counts, trigger words that are words, a hash of the weights the run loaded, no
local paths; names from input files or recipes never leave the output folder; nothing overwritten in a folder
that is not a run folder; checkpoints on disk before COMPLETE."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from finetune.errors import RecipeError, UserError
from finetune.export.context import a1111_hash, base_hash, instance_prompts, trigger_words
from tests.helpers import build_tiny_sd2, run_trainer, write_recipe
from tests.test_tools_export import run_tool


@pytest.fixture(scope="module")
def sd2_epsilon(tmp_path_factory) -> Path:
    return build_tiny_sd2(tmp_path_factory.mktemp("sd2e") / "sd2-base", prediction_type="epsilon")


def a1111_version(meta: dict[str, str]) -> str:
    """How AUTOMATIC1111 sorts a LoRA by base (network.py detect_version, re-derived)."""
    if meta.get("ss_base_model_version", "").startswith("sdxl_"):
        return "SDXL"
    if meta.get("ss_v2") == "True":
        return "SD2"
    return "SD1" if meta else "Unknown"


def test_sd2_run_metadata_is_true_and_private(tmp_path, images, sd2_epsilon):
    from finetune.export.io import read_metadata

    recipe = write_recipe(tmp_path, sd2_epsilon, images, train={"max_steps": 1},
                          data={"caption": {"template": "{trigger} {caption}", "trigger": "ohwx"}},
                          export={"formats": ["diffusers", "kohya"], "name": "k", "model_card": True})
    t = run_trainer(recipe)
    out = Path(t.cfg.output_dir)
    meta = read_metadata(out / "k.safetensors")
    assert a1111_version(meta) == "SD2" and meta["ss_base_model_version"] == "sd_v2"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-512/lora"  # epsilon, not the 768-v model
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert json.loads(meta["ss_tag_frequency"]) == {"<local>/images": {"a sks circle": 6}}  # 6 images, as captioned
    assert json.loads(meta["finetune.trigger_words"]) == ["ohwx"] and meta["modelspec.trigger_phrase"] == "ohwx"
    weights = sd2_epsilon / "unet" / "diffusion_pytorch_model.safetensors"
    assert meta["finetune.base_model_hash"] == base_hash(str(sd2_epsilon)) != hashlib.sha256(
        str(sd2_epsilon).encode()).hexdigest()[:16]
    assert "ss_sd_model_hash" not in meta  # A1111's hash exists only for single-file bases
    assert meta["finetune.base_model"] == "<local>/sd2-base" == meta["ss_sd_model_name"]
    leaks = [str(tmp_path), str(sd2_epsilon), str(images), str(Path.home())]
    for f in (out / "k.safetensors", out / "pytorch_lora_weights.safetensors"):
        values = " ".join(read_metadata(f).values())
        assert not [p for p in leaks if p in values], f.name
    card = (out / "README.md").read_text()
    assert not [p for p in leaks if p in card] and "base_model:" not in card
    assert weights.is_file()


def test_sd2_v_prediction_and_sdxl_labels(tiny_sd2_base):
    from finetune.export.kohya import network_metadata
    from finetune.models.families import FAMILIES
    from tests.helpers import make_ctx

    ctx = make_ctx()
    ctx.prediction_type = "v_prediction"
    meta = network_metadata(ctx, FAMILIES["sd2"], "4", "4", {"module": "networks.lora", "args": None})
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora" and meta["modelspec.prediction_type"] == "v"
    sdxl = network_metadata(make_ctx(), FAMILIES["sdxl"], "4", "4", {"module": "networks.lora", "args": None})
    assert a1111_version(sdxl) == "SDXL" and a1111_version(network_metadata(
        make_ctx(), FAMILIES["sd1"], "4", "4", {"module": "networks.lora", "args": None})) == "SD1"
    assert "ss_tag_frequency" not in sdxl  # no captions known: nothing invented


def test_trigger_words_are_words_and_instance_prompts_are_kept_apart(tmp_path, images):
    from finetune.recipe import load_recipe

    recipe = write_recipe(tmp_path, "toy", images, data={"sources": [
        {"type": "instance", "path": str(images), "instance_prompt": "a photo of sks dog"}]})
    r = load_recipe(recipe)
    assert trigger_words(r) == [] and instance_prompts(r) == ["a photo of sks dog"]


def test_base_hash_reads_the_weights_wherever_they_are(tmp_path, tiny_base, monkeypatch):
    """A folder, a hub id in the local cache (the same bytes: the same hash), a single file; changing one
    sampled byte changes it; an id that is not cached gives '' (no hash of the name)."""
    import shutil

    import huggingface_hub.constants as hub

    cache = tmp_path / "hub"
    snap = cache / "models--me--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_base / "unet", snap / "unet")
    (cache / "models--me--tiny" / "refs").mkdir(parents=True)
    (cache / "models--me--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    folder = base_hash(str(tiny_base))
    assert len(folder) == 16 and base_hash("me/tiny") == folder
    assert base_hash("me/not-cached") == ""
    weights = snap / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # the last sample ends at the file's end
    weights.write_bytes(bytes(data))
    assert base_hash("me/tiny") != folder
    single = tmp_path / "model.safetensors"
    single.write_bytes(bytes(range(256)) * 8192)  # 2 MiB
    assert a1111_hash(str(single)) == hashlib.sha256(single.read_bytes()[0x100000:0x110000]).hexdigest()[:8]
    assert a1111_hash(str(tiny_base)) == ""


def _a1111_embedding(path: Path, token: str) -> Path:
    from safetensors.torch import save_file

    save_file({"emb_params": torch.zeros(1, 32)}, path, metadata={"finetune.token": token})
    return path


@pytest.mark.parametrize("token", ["../../escape", "/tmp/escape", "..", ".hidden", "a\\b"])
def test_a_hostile_token_cannot_choose_where_convert_writes(tmp_path, token, capsys):
    from safetensors.torch import save_file

    out = tmp_path / "out"
    out.mkdir()
    src = _a1111_embedding(tmp_path / "emb.safetensors", token)
    assert run_tool("convert", "embedding", src, "--to", "a1111", "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not a plain file name" in err and "Traceback" not in err
    diffusers_form = tmp_path / "key.safetensors"
    save_file({token: torch.zeros(1, 32)}, diffusers_form)  # the token as the tensor key
    assert run_tool("convert", "embedding", diffusers_form, "--to", "a1111", "--out", out) == 2
    assert list(out.iterdir()) == [] and not list(tmp_path.parent.glob("escape*")) and not Path("/tmp/escape.safetensors").exists()


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".hidden", "", "~x", "a\\b"])
def test_export_name_must_be_a_plain_file_name(tmp_path, images, name):
    from finetune.recipe import load_recipe

    recipe = write_recipe(tmp_path, "toy", images, export={"name": name})
    with pytest.raises(RecipeError, match="export.name.*not a plain file name"):
        load_recipe(recipe)


def test_an_output_folder_that_is_not_a_run_is_not_overwritten(tmp_path, images):
    from finetune.recipe import load_recipe
    from finetune.train.setup import check_output_dir

    recipe = write_recipe(tmp_path, "toy", images, export={"model_card": True})
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    with pytest.raises(UserError, match="holds 'README.md', which the export would overwrite"):
        check_output_dir(load_recipe(recipe))
    check_output_dir(load_recipe(recipe, ["train.overwrite=true"]))  # asked for: allowed
    assert (out / "README.md").read_text() == "my notes"


def test_every_checkpoint_file_is_on_disk_before_complete(tmp_path, monkeypatch):
    from accelerate import Accelerator

    from finetune.train.checkpoint import TrainState, save_checkpoint

    synced: list[str] = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    params = {"unet.w": torch.nn.Parameter(torch.ones(3))}
    final = save_checkpoint(Accelerator(cpu=True), tmp_path / "ckpt", TrainState(step=1), params)
    files = [p.name for p in final.iterdir()]
    assert {"COMPLETE", "trainer_state.json", "trainable.safetensors"} <= set(files) and len(files) > 3
    assert [f for f in files if not any(s == f or s.startswith(f".{f}.") for s in synced)] == []
