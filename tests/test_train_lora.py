"""The trainer with the LoRA family: what trains, what is written, and that exports reload exactly."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.recipe import load_recipe
from tests.helpers import (
    LAYOUT_EXPORT,
    digest,
    fixed_unet_output,
    fresh_pipe,
    layout_recipe,
    max_difference,
    run_trainer,
    write_recipe,
)


def test_only_adapter_parameters_change(tmp_path, tiny_base, images):
    before = fresh_pipe(tiny_base)
    expected = {n: digest(getattr(before, n)) for n in ("unet", "vae", "text_encoder")}
    t = run_trainer(write_recipe(tmp_path, tiny_base, images, method={"text_encoder": {"enabled": True}}))
    after = {"unet": t.comps.unet, "vae": t.comps.vae, "text_encoder": t.comps.text_encoder}
    assert {n: digest(m) for n, m in after.items()} == expected
    trained = [n for n, p in t.comps.unet.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    # and the adapters did move: LoRA B starts at zero, so a trained B is non-zero
    ups = [p for n, p in t.comps.unet.named_parameters() if "lora_B" in n]
    assert max(float(p.detach().abs().max()) for p in ups) > 0
    out = Path(t.cfg.output_dir)
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "recipe.yaml").is_file()


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_diffusers_export_reloads_exactly(tmp_path, tiny_base, images, use_dora):
    recipe = write_recipe(tmp_path, tiny_base, images,
                          method={"rank": 4, "alpha": 2, "use_dora": use_dora, "targets": "attention_ff",
                                  "text_encoder": {"enabled": True, "rank": 2, "alpha": 8}})
    t = run_trainer(recipe)
    trained = fixed_unet_output(t.comps.unet, t.comps.text_encoder, t.comps.tokenizer)
    pipe = fresh_pipe(tiny_base)
    base_out = fixed_unet_output(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    pipe.load_lora_weights(t.cfg.output_dir)
    reloaded = fixed_unet_output(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    assert (trained - base_out).abs().max() > 1e-3, "training changed nothing; the comparison would be empty"
    assert (trained - reloaded).abs().max() < 1e-4
    # every module that trained got its adapter back (diffusers can silently skip some, e.g. proj_in/out)
    def adapted(module):
        return {n.split(".lora_A")[0] for n, _ in module.named_parameters() if ".lora_A." in n}
    assert adapted(pipe.unet) == adapted(t.comps.unet)
    assert adapted(pipe.text_encoder) == adapted(t.comps.text_encoder)
    assert len(adapted(pipe.unet)) > 10


@pytest.mark.parametrize("adapter", ["loha", "lokr"])
def test_loha_lokr_round_trip_through_their_loader(tmp_path, tiny_base, images, adapter):
    from finetune.export.lora import load_peft_adapter

    t = run_trainer(write_recipe(tmp_path, tiny_base, images, method={"adapter": adapter, "rank": 4, "alpha": 2}))
    trained = fixed_unet_output(t.comps.unet, t.comps.text_encoder, t.comps.tokenizer)
    pipe = fresh_pipe(tiny_base)
    loaded = load_peft_adapter(Path(t.cfg.output_dir) / "peft_adapter.safetensors", {"unet": pipe.unet})
    assert loaded == ["unet"]
    reloaded = fixed_unet_output(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    assert (trained - reloaded).abs().max() < 1e-5


def test_run_writes_grids_plot_logs_and_card(tmp_path, tiny_base, images):
    recipe = write_recipe(
        tmp_path, tiny_base, images,
        validation={"prompts": ["a sks circle", "a blue square"], "seeds": [0, 1], "steps": 2, "every": 2,
                    "at_start": True},
        export={"formats": ["diffusers", "kohya"], "model_card": True, "name": "mylora"},
        logging={"report_to": ["tensorboard"]},
    )
    t = run_trainer(recipe)
    out = Path(t.cfg.output_dir)
    grids = sorted(p.name for p in (out / "samples").glob("*.png"))
    assert grids == ["step-000000.png", "step-000002.png", "step-000004.png"]
    from PIL import Image

    with Image.open(out / "samples" / "step-000004.png") as im:
        assert im.width >= 2 * 64 and im.height >= 2 * 64  # 2 prompts x 2 seeds
    assert (out / "loss.png").stat().st_size > 1000
    rows = (out / "logs" / "loss.csv").read_text().splitlines()
    assert len(rows) == 1 + 4
    assert list((out / "logs").rglob("events.out.tfevents*"))
    card = (out / "README.md").read_text()
    assert "load_lora_weights" in card and "mylora.safetensors" in card
    assert (out / "mylora.safetensors").is_file()


def test_refuses_to_overwrite_a_finished_run(tmp_path, tiny_base, images):
    from finetune.errors import UserError

    recipe = write_recipe(tmp_path, tiny_base, images, train={"max_steps": 1})
    run_trainer(recipe)
    weights = Path(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    stamp = weights.stat().st_mtime_ns
    with pytest.raises(UserError, match="already holds a run"):
        run_trainer(recipe)
    assert weights.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("kind", ["plain", "prior", "ti"])
def test_accumulation_reproduces_the_larger_batch(tmp_path, tiny_base, kind):
    """Batch 2 accumulated twice trains on the same examples, captions, templates, noise and timesteps as
    batch 4 in one go: with prior preservation (class rows in every micro-batch) and Textual Inversion
    templates (drawn per example) too."""
    recipe = layout_recipe(tmp_path, tiny_base, kind)
    run_trainer(recipe, f"train.output_dir={tmp_path / 'big'}", "train.batch_size=4")
    run_trainer(recipe, f"train.output_dir={tmp_path / 'acc'}", "train.batch_size=2", "train.gradient_accumulation=2")
    file = LAYOUT_EXPORT[kind]
    assert max_difference(tmp_path / "big" / file, tmp_path / "acc" / file) < 1e-5


@pytest.mark.parametrize(("override", "key"), [("method.targets=[nope]", "method.targets"),
                                               ("method.text_encoder.targets=[nope]", "method.text_encoder.targets")])
def test_targets_matching_nothing_name_their_key_and_write_nothing(tmp_path, tiny_base, images, override, key):
    from finetune.errors import ModelError
    from finetune.train.trainer import train

    recipe = load_recipe(write_recipe(tmp_path, tiny_base, images, method={"text_encoder": {"enabled": True}}),
                         [override])
    with pytest.raises(ModelError, match=f"^{key} "):
        train(recipe)
    assert not (tmp_path / "out" / "recipe.yaml").exists()


def test_adapter_dropout_is_active_while_training_and_the_base_stays_the_base(tmp_path, tiny_base, images):
    """method.dropout drops the adapter's input during training steps (the frozen parts were left in eval mode,
    where it did nothing); the base's own dropout layers stay off; validation and the base forward see no dropout."""
    import torch

    from finetune.train.setup import make_accelerator
    from finetune.train.trainer import Trainer
    from tests.helpers import randomise

    r = load_recipe(write_recipe(tmp_path, tiny_base, images, method={"dropout": 0.5}))
    t = Trainer(r, make_accelerator(r))
    unet = t.comps.unet
    drops = [m for n, m in unet.named_modules() if n.rsplit(".", 1)[-1] == "lora_dropout"]
    assert drops and all(d.training for group in drops for d in group.modules())
    others = [m for m in unet.modules() if isinstance(m, torch.nn.Dropout) and not any(m is d for g in drops
                                                                                      for d in g.modules())]
    assert others and all(not m.training for m in others)  # e.g. to_out.1 of every attention
    assert not unet.training  # the base's modules (and any functional dropout they gate) stay in eval
    randomise(unet, 3)
    batch = next(iter(t.data.loader(0)))
    losses = {float(t.compute_loss(batch)[0].detach()) for _ in range(3)}
    assert len(losses) == 3  # a fresh dropout mask each forward
    t.set_training(False)  # as the loop leaves it after the last step
    assert not any(d.training for group in drops for d in group.modules())
    with torch.no_grad():
        assert len({float(t.compute_loss(batch)[0]) for _ in range(2)}) == 1
