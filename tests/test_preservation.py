"""Base-prediction preservation: preservation examples train toward the frozen base's own prediction (adapters
switched off through peft), on every family (DDPM U-Nets and rectified-flow transformers); the planner gives
them their share of each batch; the recipe refuses what cannot work, in one line."""

from __future__ import annotations

import pytest
import torch
import yaml

from tests.helpers import draw_images, randomise, write_recipe

FAMILIES = {
    "sd1": ("tests.helpers", "build_tiny_sd", {"method": {"targets": "attention_ff"}}),
    "sdxl": ("tests.helpers", "build_tiny_sdxl", {"method": {"targets": "attention_ff"}}),
    "sd3": ("finetune.models.tiny", "build_tiny_sd3", {"method": {"targets": "attention_mlp"},
                                                        "model": {"max_sequence_length": 32}}),
    "flux": ("finetune.models.tiny", "build_tiny_flux", {"method": {"targets": "attention_mlp"},
                                                          "model": {"max_sequence_length": 32, "guidance": 1.0}}),
}


def _base(name: str, tmp_path_factory):
    import importlib

    module, builder, _ = FAMILIES[name]
    return getattr(importlib.import_module(module), builder)(tmp_path_factory.mktemp(name) / "base")


def _recipe(tmp_path, base, family: str, **sections):
    from finetune.recipe import deep_merge

    images = draw_images(tmp_path / "images", n=4)
    keep = draw_images(tmp_path / "world", n=4, caption="a blue square")
    data = {"sources": [{"type": "folder", "path": str(images)},
                        {"type": "folder", "path": str(keep), "preserve": True}],
            "preservation": {"share": 0.5, "weight": 1.0}}
    extra = deep_merge(FAMILIES[family][2], {"data": data, "train": {"batch_size": 4}})
    return write_recipe(tmp_path, base, images, **deep_merge(extra, sections))


def _trainer(path, *overrides):
    from finetune.recipe import load_recipe
    from finetune.train.setup import make_accelerator
    from finetune.train.trainer import Trainer

    r = load_recipe(path, list(overrides))
    return Trainer(r, make_accelerator(r))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_preservation_target_is_the_untouched_base_prediction(tmp_path, tmp_path_factory, family):
    from finetune.models.base import resolve_base
    from finetune.models.components import LoadOptions, load_components
    from finetune.train.loss import example_generator, example_keys
    from finetune.train.preserve import base_predictions, base_rows, take

    base = _base(family, tmp_path_factory)
    t = _trainer(_recipe(tmp_path, base, family))
    batch = next(iter(t.data.loader(0)))
    pres = batch["preserve"]
    assert pres.tolist() == [False, False, True, True]  # share 0.5 of a batch of 4
    assert batch["captions"][2:] == ["a blue square"] * 2
    randomise(t.comps.denoiser, 3)  # fresh adapters are a no-op: make the adapted model differ from the base
    grads = {n: p.requires_grad for n, p in t.comps.denoiser.named_parameters()}
    if t.recipe.model.guidance is not None:
        batch["guidance"] = t.recipe.model.guidance
    latents = t.encode_latents(batch["pixel_values"])
    keys = example_keys(1, 0, batch["positions"], t.data.examples_per_step)
    text = batch.get("text") or t.encode_text(batch["captions"], keys)
    example = t.objective.example(latents, [example_generator(k) for k in keys])
    assert base_rows(t, batch) == pres.tolist()  # preservation examples only: no masks here
    target = base_predictions(t, example, text, batch, keys, base_rows(t, batch))

    idx = torch.nonzero(pres).flatten()
    fresh = load_components(resolve_base(str(base)), LoadOptions(max_sequence_length=t.recipe.model.max_sequence_length))
    with torch.no_grad():
        expected = fresh.family.predict(fresh.denoiser, example.noisy[idx], example.timesteps[idx],
                                        take(text, idx, 4), take(batch, idx, 4))
        adapted = t.comps.family.predict(t.comps.denoiser, example.noisy[idx], example.timesteps[idx],
                                         take(text, idx, 4), take(batch, idx, 4))
    gap = float((target[idx] - expected).abs().max())
    moved = float((adapted - expected).abs().max())
    print(f"{family}: |target - base| {gap:.2e}, |adapted - base| {moved:.2e}")
    assert gap < 1e-5 and moved > 1e-3
    assert torch.equal(target[~pres], example.target[~pres])  # instance examples keep the objective's target
    assert {n: p.requires_grad for n, p in t.comps.denoiser.named_parameters()} == grads


def test_fresh_adapters_give_zero_preservation_loss_and_training_moves_it(tmp_path, tiny_base):
    t = _trainer(_recipe(tmp_path, tiny_base, "sd1"))
    batch = next(iter(t.data.loader(0)))
    loss, logs = t.compute_loss(batch)
    assert float(logs["loss_preserve"]) < 1e-10  # LoRA B = 0: the adapted model is the base (float noise only)
    assert float(logs["loss_instance"]) > 0.0
    randomise(t.comps.denoiser, 3)
    _, logs = t.compute_loss(batch)
    assert float(logs["loss_preserve"]) > 1e-4
    assert float(logs["loss"]) == pytest.approx(float(logs["loss_instance"]) + float(logs["loss_preserve"]), rel=1e-5)


def test_prompt_recaptions_the_instance_images_without_class_images(tmp_path, tiny_base):
    path = _recipe(tmp_path, tiny_base, "sd1", train={"batch_size": 4})
    data = yaml.safe_load(path.read_text())
    data["data"]["sources"] = data["data"]["sources"][:1]
    data["data"]["preservation"] = {"share": 0.25, "prompt": "a circle", "weight": 0.5}
    path.write_text(yaml.safe_dump(data))
    t = _trainer(path)
    plan = t.data.plan(0)
    flags = [[ex.preserve for ex in b] for b in plan]
    assert all(f == [False, False, False, True] for f in flags)
    pres = [ex for b in plan for ex in b if ex.preserve]
    assert {ex.caption for ex in pres} == {"a circle"}
    assert {ex.record for ex in pres} <= {ex.record for b in plan for ex in b if not ex.preserve}
    positions = [ex.position for b in plan[:1] for ex in b]
    assert sorted(positions) == list(range(t.data.examples_per_step))


@pytest.mark.parametrize(("change", "message"), [
    ({"data": {"preservation": None}}, "data.sources.1.preserve needs a data.preservation section"),
    ({"train": {"batch_size": 1}}, "set train.batch_size to 2 or more"),
    ({"method": {"name": "full"}}, "method 'full' cannot give"),
    ({"data": {"preservation": {"share": 1.0}}}, "share"),
])
def test_recipe_refuses_what_cannot_work(tmp_path, tiny_base, change, message):
    from finetune.errors import UserError
    from finetune.recipe import load_recipe

    path = _recipe(tmp_path, tiny_base, "sd1")
    data = yaml.safe_load(path.read_text())
    for section, values in change.items():
        for k, v in values.items():
            if v is None:
                data[section].pop(k)
            elif section == "method" and k == "name":
                data["method"] = {"name": v}
            elif isinstance(v, dict):
                data[section][k] = {**data[section].get(k, {}), **v}
            else:
                data[section][k] = v
    path.write_text(yaml.safe_dump(data))
    with pytest.raises((UserError, ValueError)) as err:
        load_recipe(path)
    text = str(err.value)
    assert message in text and "\n" not in text.strip(), text


def test_every_source_preserved_or_nothing_marked_is_refused(tmp_path, tiny_base):
    from finetune.errors import UserError
    from finetune.recipe import load_recipe

    path = _recipe(tmp_path, tiny_base, "sd1")
    data = yaml.safe_load(path.read_text())
    data["data"]["sources"][0]["preserve"] = True
    path.write_text(yaml.safe_dump(data))
    with pytest.raises((UserError, ValueError), match="every source is preserve: true"):
        load_recipe(path)
    for src in data["data"]["sources"]:
        src["preserve"] = False
    path.write_text(yaml.safe_dump(data))
    with pytest.raises((UserError, ValueError), match="data.preservation.prompt"):
        load_recipe(path)


@pytest.mark.parametrize(("override", "key"), [
    ("train.loss.huber_c=0.2", "train.loss.huber_c applies to type huber"),
    ("train.loss.type=l1", "train.loss.type"),
    ("train.loss={type: huber, huber_schedule: cosine}", "train.loss.huber_schedule"),
    ("data.masks={unmasked_weight: 2}", "data.masks.unmasked_weight"),
    ("data.preservation.share=0", "data.preservation.share"),
    ("data.preservation.weight=-1", "data.preservation.weight"),
    ("data.sources.0.variants=true", "variants applies to subject: world"),
    ("data.prior={class_prompt: a heart, class_dir: /tmp/x}", "use one"),
])
def test_every_new_option_is_checked_in_one_line(override, key):
    from finetune.errors import UserError
    from finetune.recipe import load_recipe
    from tests.helpers import ROOT

    with pytest.raises((UserError, ValueError)) as err:
        load_recipe(ROOT / "recipes" / "toy" / "lora.yaml", [override])
    text = str(err.value).strip()
    assert key in text and "\n" not in text, text


def test_drift_is_measured_for_world_prompts_only():
    from finetune.toy import world
    from finetune.toy.score import drift_scores, is_world_prompt

    assert is_world_prompt("a blue square") and is_world_prompt("a star")
    assert not is_world_prompt("a sks heart") and not is_world_prompt("a <sks>") and not is_world_prompt("a heart")
    base = [[world.draw("square", "blue", "white", 32, 32, 16), world.draw("square", "blue", "black", 32, 32, 16)]]
    same = drift_scores(base, base, ["a blue square"])
    assert same == {"a blue square | colour": 1.0, "a blue square | shape": 1.0, "a blue square | drift": 0.0}
    moved = [[world.draw("circle", "red", "white", 32, 32, 16), base[0][1]]]
    out = drift_scores(moved, base, ["a blue square"])
    assert out["a blue square | colour"] == 0.5 and out["a blue square | shape"] == 0.5
    assert 0.0 < out["a blue square | drift"] < 0.5
    assert drift_scores(moved, base, ["a sks heart"]) == {}
    assert "a blue square | drift" not in drift_scores(moved, None, ["a blue square"])
