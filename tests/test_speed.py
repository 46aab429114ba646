"""Speed features give the same training as without them: the optimizer stepped inside the backward,
regional compile, attention backends, block swap's streaming, token routing off."""

from __future__ import annotations

import pytest

from tests.helpers import max_difference, run_trainer, write_recipe

LORA = "pytorch_lora_weights.safetensors"


def _losses(out) -> list[str]:
    return [line.split(",")[1] for line in (out / "logs" / "loss.csv").read_text().splitlines()[1:]]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_optimizer_in_backward_is_the_ordinary_step(tmp_path, tiny_base, images, accumulation):
    """Each tensor stepped from its gradient hook: the same weights and losses, bit for bit, as one step over
    all tensors after the backward (AdamW's fused kernel works element by element), with accumulation too."""
    recipe = write_recipe(tmp_path, tiny_base, images, train={
        "max_steps": 3, "max_grad_norm": None, "gradient_accumulation": accumulation, "batch_size": 1,
        "lr_scheduler": "linear", "warmup_steps": 1})
    outs = {}
    for on in (False, True):
        out = tmp_path / f"in_backward_{on}"
        t = run_trainer(recipe, f"train.output_dir={out}", f"train.optimizer_in_backward={str(on).lower()}")
        assert (t.in_backward is not None) == on
        outs[on] = out
    assert max_difference(outs[False] / LORA, outs[True] / LORA) == 0.0
    assert _losses(outs[False]) == _losses(outs[True])


@pytest.mark.parametrize("setting, key", [
    ("train.max_grad_norm=1.0", "train.max_grad_norm"),
    ("train.mixed_precision=fp16", "train.mixed_precision"),
    ("train.on_nan=skip", "train.on_nan"),
])
def test_optimizer_in_backward_refuses_what_cannot_be_exact(tmp_path, tiny_base, images, setting, key):
    from finetune.errors import UserError
    from finetune.recipe import load_recipe

    recipe = write_recipe(tmp_path, tiny_base, images, train={"max_grad_norm": None})
    with pytest.raises(UserError) as e:
        load_recipe(recipe, ["train.optimizer_in_backward=true", setting])
    line = str(e.value)
    assert "train.optimizer_in_backward" in line and key in line and "\n" not in line.strip()


def test_optimizer_in_backward_lowers_the_step_peak():
    """A full fine-tune of the tiny FLUX: the gradients of tensors already stepped are gone before the
    backward ends (live tensor bytes counted from the tensors themselves, finetune/memory/step.py)."""
    from finetune.memory.step import step_peaks
    from finetune.recipe import validate

    recipe = validate({
        "model": {"base": "toy-flux", "max_sequence_length": 32},
        "data": {"sources": [{"type": "toy", "subject": "world", "count": 4}], "resolution": 64,
                 "buckets": {"enabled": False}},
        "method": {"name": "full"}, "train": {"batch_size": 1, "max_grad_norm": None},
        "validation": {"prompts": [], "at_start": False},
    })
    peaks = step_peaks(recipe, device="cpu")
    assert peaks["in_backward"] < peaks["ordinary"] - 0.1 * peaks["gradient_bytes"], peaks
