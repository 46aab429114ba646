"""Fully-sharded training (FSDP2 through accelerate, the shipped recipes/accelerate/fsdp.yaml) with 2 CPU
processes on the gloo backend: the same weights as 1 process at the same global batch, exact resume after a
SIGKILL, and exports that load in stock diffusers."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.errors import UserError
from tests.helpers import (
    FSDP_CPU,
    fixed_unet_output,
    kill_launch,
    launch,
    layout_recipe,
    run_trainer,
    start_launch,
    wait_gone,
)

LORA = "pytorch_lora_weights.safetensors"
UNET = Path("model") / "unet" / "diffusion_pytorch_model.safetensors"
SHARDED = "2 processes, FSDP2 (trained parameters sharded)"


def biggest_difference(a: Path, b: Path) -> tuple[float, float]:
    """(largest |a - b|, largest |b|) over two safetensors files with the same keys."""
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys() and x
    return (max(float((x[k] - y[k]).abs().max()) for k in x), max(float(y[k].abs().max()) for k in y))


def full_recipe(tmp_path: Path, base: Path, **train) -> Path:
    import yaml

    path = layout_recipe(tmp_path, base, "plain", lr=1e-4, **train)
    data = yaml.safe_load(path.read_text())
    data["method"] = {"name": "full"}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_fsdp_lora_matches_one_process_and_loads_in_diffusers(tmp_path, tiny_base):
    from diffusers import StableDiffusionPipeline

    recipe = layout_recipe(tmp_path, tiny_base, "plain", checkpoint_every=2)
    two = launch(recipe, FSDP_CPU, f"train.output_dir={tmp_path / 'two'}", "train.batch_size=2", timeout=420)
    assert two.returncode == 0, two.stderr[-3000:]
    assert SHARDED in two.stdout + two.stderr
    # accelerate's FSDP checkpoint files, not the data-parallel ones
    assert (tmp_path / "two" / "checkpoints" / "step-000002" / "pytorch_model_fsdp.bin").is_file()
    run_trainer(recipe, f"train.output_dir={tmp_path / 'one'}", "train.batch_size=4")
    diff, scale = biggest_difference(tmp_path / "two" / LORA, tmp_path / "one" / LORA)
    print(f"FSDP LoRA vs 1 process: max |difference| {diff:.3g} (largest weight {scale:.3g})")
    assert diff < 1e-5 * max(1.0, scale)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
    before = fixed_unet_output(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    pipe.load_lora_weights(tmp_path / "two")
    after = fixed_unet_output(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    assert float((after - before).abs().max()) > 1e-6  # the LoRA landed on the U-Net


def kill_after_first_checkpoint(recipe: Path, out: Path, launcher: list[str]) -> None:
    proc = start_launch(recipe, launcher, f"train.output_dir={out}", "train.batch_size=2")
    marker = out / "checkpoints" / "step-000002" / "COMPLETE"
    deadline = time.monotonic() + 420
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_launch(proc)
            raise AssertionError(f"no checkpoint appeared:\n{proc.communicate()[1][-3000:]}")
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)  # the launcher only: its ranks must not train on as orphans
    proc.communicate()
    assert wait_gone(proc) == []
    assert not (out / "model").exists(), "the run finished before it could be killed"


@pytest.mark.slow
def test_fsdp_full_sharded_checkpoint_resumes_after_sigkill(tmp_path, tiny_base):
    """Full fine-tuning with sharded checkpoints (each rank writes its own shards): killed after the step-2
    checkpoint, resumed, it ends where 1 process ends; the exported pipeline loads in stock diffusers."""
    from diffusers import StableDiffusionPipeline

    recipe = full_recipe(tmp_path, tiny_base, checkpoint_every=2, max_steps=6)
    sharded = [*FSDP_CPU, "--fsdp_state_dict_type", "SHARDED_STATE_DICT"]
    out = tmp_path / "two"
    kill_after_first_checkpoint(recipe, out, sharded)
    assert (out / "checkpoints" / "step-000002" / "optimizer_0" / ".metadata").is_file()  # torch DCP shards
    resumed = launch(recipe, sharded, f"train.output_dir={out}", "train.batch_size=2", "train.resume=latest",
                     timeout=420)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and SHARDED in resumed.stdout + resumed.stderr
    run_trainer(recipe, f"train.output_dir={tmp_path / 'one'}", "train.batch_size=4")
    diff, scale = biggest_difference(out / UNET, tmp_path / "one" / UNET)
    moved, _ = biggest_difference(out / UNET, tiny_base / "unet" / "diffusion_pytorch_model.safetensors")
    print(f"FSDP full, killed and resumed, vs 1 process: max |difference| {diff:.3g}; training moved {moved:.3g}")
    assert diff < 1e-5 * max(1.0, scale) and moved > 1e-4

    configs = [json.loads(p.read_text()) for p in (out / "model").rglob("*.json")]
    assert not [c for c in configs if "FSDP" in json.dumps(c)]  # the wrapper's class names stay out
    pipe = StableDiffusionPipeline.from_pretrained(out / "model")
    mine = load_file(out / UNET)
    assert all(torch.equal(v, mine[k]) for k, v in pipe.unet.state_dict().items())


class _Plugin:
    fsdp_version = 2
    activation_checkpointing = False


class _FsdpAccelerator:
    from accelerate.utils import DistributedType

    distributed_type = DistributedType.FSDP
    state = type("S", (), {"fsdp_plugin": _Plugin()})()


@pytest.mark.parametrize(("trained", "ema", "words"), [
    (["unet", "text_encoder"], False, "FSDP shards one model"),
    (["unet"], True, "train.ema.enabled"),
])
def test_fsdp_refuses_what_it_cannot_shard_in_one_line(trained, ema, words):
    from finetune.train.distributed import check_sharding

    with pytest.raises(UserError, match=words) as e:
        check_sharding(_FsdpAccelerator(), trained, ema)
    assert "\n" not in str(e.value)
    check_sharding(_FsdpAccelerator(), ["unet"], False)  # one model, no EMA: fine
