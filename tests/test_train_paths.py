"""Advertised paths that must be right, checked by numbers: fp16 loss-scaler overflows, a non-finite
micro-batch under accumulation, EMA (hand-computed, resumed, and what the final grid shows), Textual
Inversion checkpoints, pivotal phases as parameter groups, Ctrl-C before training, and model.attention."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.helpers import (
    ROOT,
    TI_METHOD,
    db_recipe,
    fixed_unet_output,
    fresh_pipe,
    run_trainer,
    write_recipe,
)


def lora_b(t) -> float:
    return max(float(p.detach().abs().max()) for n, p in t.comps.unet.named_parameters() if "lora_B" in n)


def after_each_step(monkeypatch, record) -> None:
    """Call record(trainer) after every optimizer step (the loop calls _after_step then)."""
    import finetune.train.loop as loop

    original = loop._after_step

    def wrapped(t, logs):
        record(t)
        original(t, logs)

    monkeypatch.setattr(loop, "_after_step", wrapped)


class InfGradient(torch.autograd.Function):
    """Identity forward; an inf gradient backward: what a too-high fp16 loss scale produces."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


# ------------------------------------------------------------------------------------------- fp16 scaling
def test_fp16_overflow_is_a_skipped_step_not_a_nan(tmp_path, tiny_base, images, monkeypatch):
    """An inf gradient at step 1 under fp16: the GradScaler skips that update and halves its scale, the run
    goes on (no NaN skip counted, on_nan: stop does not fire), later steps train, and the learning-rate
    schedule does not advance for the skipped step. (CPU autocast fp16 with torch's CPU GradScaler.)"""
    from finetune.train.trainer import Trainer

    original = Trainer.compute_loss

    def overflowing(self, batch):
        loss, logs = original(self, batch)
        return (InfGradient.apply(loss) if self.state.step == 0 else loss), logs

    monkeypatch.setattr(Trainer, "compute_loss", overflowing)
    seen = []
    after_each_step(monkeypatch, lambda t: seen.append((lora_b(t), t.acc.scaler.get_scale())))
    t = run_trainer(write_recipe(tmp_path, tiny_base, images, train={"mixed_precision": "fp16", "max_steps": 3}))
    assert t.comps.unet.conv_in.weight.dtype == torch.float16  # frozen parts really are fp16
    assert t.state.step == 3 and t.state.nan_skips == 0
    assert seen[0] == (0.0, 32768.0), "step 1 overflowed: no update (LoRA B still 0) and the scale halved"
    assert seen[1][0] > 0 and seen[2][1] == 32768.0, "steps 2 and 3 trained at the lowered scale"
    assert t.lr_scheduler.scheduler.last_epoch == 2  # two real updates, two schedule steps
    out = load_file(Path(t.cfg.output_dir) / "pytorch_lora_weights.safetensors")
    assert all(torch.isfinite(v).all() for v in out.values())


# ------------------------------------------------------------------------------------ NaN under accumulation
def test_a_non_finite_micro_batch_drops_its_whole_step(tmp_path, tiny_base, images, monkeypatch):
    """on_nan: skip with accumulation 2: a NaN loss in the first micro-batch drops that optimizer step whole
    (its micro-batches are still computed: finiteness is read once per optimizer step); every step that is
    applied is made of exactly 2 micro-batches' gradients."""
    from accelerate import Accelerator

    from finetune.train.trainer import Trainer

    original, calls = Trainer.compute_loss, []

    def first_is_nan(self, batch):
        loss, logs = original(self, batch)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 1 else loss), logs

    monkeypatch.setattr(Trainer, "compute_loss", first_is_nan)
    backward, since_step, per_step = Accelerator.backward, [0], []

    def counting(self, loss, **kwargs):
        since_step[0] += 1
        return backward(self, loss, **kwargs)

    monkeypatch.setattr(Accelerator, "backward", counting)

    def record(t):
        per_step.append(since_step[0])
        since_step[0] = 0

    after_each_step(monkeypatch, record)
    non_finite = Trainer._non_finite

    def dropped(self, *args):  # the dropped step's gradients are thrown away with it
        since_step[0] = 0
        return non_finite(self, *args)

    monkeypatch.setattr(Trainer, "_non_finite", dropped)
    t = run_trainer(write_recipe(tmp_path, tiny_base, images,
                                 train={"max_steps": 2, "gradient_accumulation": 2, "on_nan": "skip"}))
    assert t.state.step == 2 and t.state.nan_skips == 1
    assert per_step == [2, 2], "a step was applied with fewer micro-batches than accumulated"
    assert t.state.batch_in_epoch + t.state.epoch * t.data.batches_per_epoch == 6  # the dropped step's 2 + 2 x 2


# ----------------------------------------------------------------------------------------------------- EMA
def test_ema_is_the_hand_computed_average_and_the_final_grid_shows_it(tmp_path, tiny_base, images, monkeypatch):
    """decay 0.9 over 3 updates: diffusers' EMAModel uses min(decay, (1 + n) / (10 + n)) for the n-th update
    after the first (which copies). The final grid is rendered from the EMA weights that are exported."""
    import finetune.train.loop as loop

    steps: list[dict[str, torch.Tensor]] = []
    after_each_step(monkeypatch, lambda t: steps.append({k: v.detach().clone() for k, v in t.params.items()}))
    at_grid = []
    validate = loop.validate
    monkeypatch.setattr(loop, "validate", lambda t, step: at_grid.append(
        {k: v.detach().clone() for k, v in t.params.items()}) or validate(t, step))
    t = run_trainer(write_recipe(tmp_path, tiny_base, images,
                                 train={"max_steps": 3, "ema": {"enabled": True, "decay": 0.9}},
                                 validation={"prompts": ["a sks circle"], "seeds": [0], "steps": 1, "at_start": False}))
    shadow = dict(zip(t.params, t.ema.shadow_params, strict=True))
    for name in t.params:
        s = steps[0][name]  # the first update copies the weights
        for n, after in enumerate(steps[1:], start=1):
            d = min(0.9, (1 + n) / (10 + n))
            s = d * s + (1 - d) * after[name]
        assert torch.allclose(shadow[name], s, rtol=1e-5, atol=1e-8), name
    final = at_grid[-1]  # what the final grid (and the model card) was rendered from
    assert any(not torch.equal(final[k], steps[-1][k]) for k in final), "the grid showed the raw weights"
    assert all(torch.equal(final[k], shadow[k]) and torch.equal(t.params[k], shadow[k]) for k in final)


# ---------------------------------------------------------------------------------- Textual Inversion at scale
def test_textual_inversion_checkpoints_hold_only_the_new_rows(tmp_path):
    """The toy base's TI checkpoint (weights, Adam state, RNG, trainer state) is a few KB: the vocabulary's
    49k rows are neither trained nor saved."""
    t = run_trainer(ROOT / "recipes" / "toy" / "textual_inversion.yaml", f"train.output_dir={tmp_path / 'ti'}",
                    "train.max_steps=2", "train.checkpoint_every=1", "validation.prompts=[]",
                    "logging.report_to=[]", "logging.progress=false")
    folder = tmp_path / "ti" / "checkpoints" / "step-000001"
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 1_000_000, f"{size} bytes"
    trained = load_file(folder / "trainable.safetensors")
    assert [tuple(v.shape) for v in trained.values()] == [(2, 64)]
    state = t.optimizer.optimizer.state
    assert sum(v.numel() for s in state.values() for v in s.values() if torch.is_tensor(v)) < 1000


def test_pivotal_phases_are_parameter_groups(tmp_path, tiny_base, monkeypatch):
    """token_steps 1 of 3: the LoRA's Adam state saw only its 2 steps, the tokens' only their 1, and the
    LoRA's warm-up starts at its own first step. With a text-encoder LoRA beside the new rows, the LoRA file
    holds no embedding table and both files reload in diffusers to the trained output."""
    from diffusers import StableDiffusionPipeline

    from tests.helpers import draw_images

    images = draw_images(tmp_path / "images", caption="")
    path = write_recipe(tmp_path, tiny_base, images, train={"max_steps": 3, "warmup_steps": 1,
                                                            "lr_scheduler": "constant_with_warmup"})
    data = yaml.safe_load(path.read_text())
    data["method"] = {"name": "pivotal", "embedding": {k: v for k, v in TI_METHOD.items() if k != "name"},
                      "lora": {"rank": 4, "alpha": 4, "targets": "attention_ff", "text_encoder": {"enabled": True}},
                      "token_steps": 1}
    path.write_text(yaml.safe_dump(data))
    lrs = []  # after each step: the learning rates of the next one
    after_each_step(monkeypatch, lambda t: lrs.append([g["lr"] for g in t.optimizer.param_groups]))
    t = run_trainer(path)
    opt = t.optimizer.optimizer
    rows = [g for g in opt.param_groups if g.get("active_steps") == (0, 1)]
    lora = [g for g in opt.param_groups if g.get("active_steps") == (1, None)]
    assert rows and lora
    assert {int(opt.state[p]["step"]) for g in lora for p in g["params"]} == {2}
    assert {int(opt.state[p]["step"]) for g in rows for p in g["params"]} == {1}
    # one warm-up step: a schedule over the whole run would be warm at step 1; the LoRA's starts there
    assert [r[0] for r in lrs] == pytest.approx([0.0, 1e-3, 0.0])  # LoRA: steps 1 (warm-up) and 2; then done
    assert [r[-1] for r in lrs] == pytest.approx([0.0, 0.0, 0.0])  # tokens: their window ended at step 1
    out = Path(t.cfg.output_dir)
    lora_file = load_file(out / "pytorch_lora_weights.safetensors")
    assert not [k for k in lora_file if "embed" in k] and any(k.startswith("text_encoder.") for k in lora_file)
    pipe = fresh_pipe(tiny_base)
    pipe.load_textual_inversion(str(out))
    pipe.load_lora_weights(str(out))
    trained = StableDiffusionPipeline(**(pipe.components | {"unet": t.comps.unet, "text_encoder": t.comps.text_encoder,
                                                           "tokenizer": t.comps.tokenizer}))
    with torch.no_grad():
        ours, _ = trained.encode_prompt("a <sks> circle", "cpu", 1, False)
        theirs, _ = pipe.encode_prompt("a <sks> circle", "cpu", 1, False)
    assert (ours - theirs).abs().max() < 1e-5


# -------------------------------------------------------------------------------------------------- Ctrl-C
def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("phase", ["class images", "caching", "step-0 grid"])
def test_ctrl_c_before_training_is_one_line(tmp_path, tiny_base, images, monkeypatch, capsys, phase):
    from finetune.run import main

    if phase == "class images":
        import finetune.data.prior as prior

        recipe = db_recipe(tmp_path, tiny_base, images, method={"name": "lora", "rank": 4})
        monkeypatch.setattr(prior, "render", _interrupt)
    elif phase == "caching":
        from finetune.train.trainer import Trainer

        recipe = write_recipe(tmp_path, tiny_base, images, data={"cache_latents": True})
        monkeypatch.setattr(Trainer, "encode_latents", _interrupt)
    else:
        import finetune.train.validation as validation

        recipe = write_recipe(tmp_path, tiny_base, images, validation={"prompts": ["a circle"], "at_start": True})
        monkeypatch.setattr(validation, "render", _interrupt)
    with pytest.raises(SystemExit) as info:
        main([str(recipe)])
    assert info.value.code == 130
    err = capsys.readouterr().err.strip()  # the banner may come first, then one line, no traceback
    assert err.splitlines()[-1].startswith("interrupted (Ctrl-C)") and "Traceback" not in err, err


# ------------------------------------------------------------------------------------------ model.attention
def test_attention_choice_sets_the_processors_and_both_agree(tiny_base):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from finetune.models.base import resolve_base
    from finetune.models.components import LoadOptions, load_components

    outs = {}
    for kind, cls in (("sdpa", AttnProcessor2_0), ("eager", AttnProcessor)):
        comps = load_components(resolve_base(str(tiny_base)), LoadOptions(attention=kind))
        processors = list(comps.unet.attn_processors.values())
        assert processors and all(type(p) is cls for p in processors), kind
        outs[kind] = fixed_unet_output(comps.unet, comps.text_encoder, comps.tokenizer)
    assert (outs["sdpa"] - outs["eager"]).abs().max() < 1e-5


def test_xformers_without_the_package_is_a_recipe_error(tmp_path, tiny_base, images, monkeypatch):
    import finetune.sections as sections
    from finetune.errors import RecipeError
    from finetune.recipe import load_recipe

    monkeypatch.setattr(sections, "_installed", lambda package: False)
    with pytest.raises(RecipeError, match="model.attention: 'xformers' needs the xformers package") as info:
        load_recipe(write_recipe(tmp_path, tiny_base, images, logging={"report_to": []}), ["model.attention=xformers"])
    assert "\n" not in str(info.value)
