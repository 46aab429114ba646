"""Start-up: bitsandbytes is left out of runs that cannot use it, and kept for every run that might."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest

from tests.helpers import ROOT


def _recipe(*overrides: str):
    from finetune.recipe import load_recipe

    return load_recipe(ROOT / "recipes" / "toy" / "lora.yaml", list(overrides))


def test_the_toy_run_does_not_need_bitsandbytes():
    from finetune.startup import needs_bitsandbytes

    assert not needs_bitsandbytes(_recipe())


@pytest.mark.parametrize("override", ["model.quantize=nf4", "model.quantize=int8", "model.quantize_text_encoders=nf4",
                                      "train.optimizer=adamw8bit"])
def test_a_run_that_asks_for_it_keeps_it(override):
    from finetune.startup import needs_bitsandbytes

    assert needs_bitsandbytes(_recipe(override))


def test_a_base_quantized_with_bitsandbytes_keeps_it(tmp_path, tiny_base):
    """A diffusers folder whose component config carries a bitsandbytes quantization_config, and a single file
    with bitsandbytes quantization state among its tensors; a hub id not in the cache cannot be looked at."""
    import shutil

    from finetune.models.base import resolve_base
    from finetune.startup import _may_be_quantized

    assert not _may_be_quantized(resolve_base(str(tiny_base)))
    folder = tmp_path / "prequantized"
    shutil.copytree(tiny_base, folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    assert _may_be_quantized(resolve_base(str(folder)))

    def single_file(path, names):
        header = json.dumps({n: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
                             for i, n in enumerate(names)}).encode()
        path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4 * len(names))
        return path

    plain = single_file(tmp_path / "plain.safetensors", ["model.diffusion_model.out.weight"])
    nf4 = single_file(tmp_path / "nf4.safetensors", ["model.diffusion_model.out.weight",
                                                     "model.diffusion_model.out.weight.absmax"])
    from finetune.startup import _file_is_quantized

    assert not _file_is_quantized(plain) and _file_is_quantized(nf4)
    assert _file_is_quantized(tmp_path / "model.ckpt")  # a pickle: unknown, so kept
    assert _may_be_quantized(resolve_base("some-org/not-in-the-cache"))


PROBE = """
import sys
from finetune.recipe import load_recipe
from finetune.startup import leave_out_bitsandbytes
left_out = leave_out_bitsandbytes(load_recipe("recipes/toy/lora.yaml", sys.argv[1:]))
import peft  # noqa: F401
from diffusers.utils import is_bitsandbytes_available
from diffusers.training_utils import compute_snr  # noqa: F401  (imports the model classes and the quantizers)
print(left_out, sys.modules.get("bitsandbytes") is not None, is_bitsandbytes_available())
"""


@pytest.mark.parametrize(("overrides", "expected"), [((), "True False False"),
                                                     (("train.optimizer=adamw8bit",), "False True True")])
def test_diffusers_and_peft_import_it_only_when_the_run_may_use_it(overrides, expected):
    done = subprocess.run([sys.executable, "-c", PROBE, *overrides], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == expected
