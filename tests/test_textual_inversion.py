"""Textual Inversion and pivotal tuning: only the new rows train, exports reload exactly, bad input is caught.

The slow tests at the end train on the toy base and measure that the new word learned the subject.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from finetune.errors import RecipeError, UserError
from finetune.recipe import load_recipe
from tests.helpers import digest, draw_images, fresh_pipe, load_comps, run_trainer, write_recipe

TOKEN = "<sks>"
TI = {"name": "textual_inversion", "token": TOKEN, "num_vectors": 2, "initializer": "circle", "lr": 5e-2}
PIVOTAL = {"name": "pivotal", "embedding": {"token": TOKEN, "num_vectors": 2, "initializer": "circle", "lr": 5e-2},
           "lora": {"rank": 4, "alpha": 4, "targets": "attention_ff"}}


def ti_recipe(tmp_path: Path, base, method=None, caption: str = "", **sections) -> Path:
    images = draw_images(tmp_path / "images", caption=caption)  # empty captions: the templates fill them
    sections.setdefault("export", {"formats": ["diffusers", "a1111"], "name": "concept"})
    path = write_recipe(tmp_path, base, images, **sections)
    data = yaml.safe_load(path.read_text())
    data["method"] = method or TI  # replaced, not merged into write_recipe's LoRA section
    path.write_text(yaml.safe_dump(data))
    return path


def encoder_rows(pipe_or_comps) -> torch.Tensor:
    return pipe_or_comps.text_encoder.get_input_embeddings().weight.detach()


def latents(pipe, prompt: str) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, generator=g, output_type="latent", height=64, width=64,
                guidance_scale=1.0).images


def trained_pipe(base: Path, t):
    """The base pipeline with the run's (trained, in-memory) components swapped in."""
    from diffusers import StableDiffusionPipeline

    parts = fresh_pipe(base).components | {"unet": t.comps.unet, "text_encoder": t.comps.text_encoder,
                                           "tokenizer": t.comps.tokenizer}
    return StableDiffusionPipeline(**parts)


@pytest.fixture(scope="module")
def ti_run(tiny_base, tmp_path_factory):
    return run_trainer(ti_recipe(tmp_path_factory.mktemp("ti"), tiny_base))


@pytest.fixture(scope="module")
def pivotal_run(tiny_base, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pivotal")
    return run_trainer(ti_recipe(tmp, tiny_base, method=PIVOTAL,
                                 export={"formats": ["diffusers", "kohya"], "name": "piv", "model_card": True}))


# ------------------------------------------------------------------------------------------- plumbing
def test_only_the_new_rows_change(tiny_base, ti_run):
    base = fresh_pipe(tiny_base)
    comps = ti_run.comps
    assert digest(comps.unet) == digest(base.unet) and digest(comps.vae) == digest(base.vae)
    old, new = encoder_rows(base), encoder_rows(comps)
    assert new.shape[0] == old.shape[0] + 2
    assert torch.equal(new[: old.shape[0]], old), "a frozen embedding row moved"
    rest = {k: v for k, v in comps.text_encoder.state_dict().items() if "token_embedding" not in k}
    assert all(torch.equal(v, base.text_encoder.state_dict()[k]) for k, v in rest.items())
    ids = comps.tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"])
    assert ids == [old.shape[0], old.shape[0] + 1]
    start = old[comps.tokenizer.convert_tokens_to_ids(["circle</w>"])[0]]
    moved = (new[ids] - start).abs().amax(1)
    assert bool((moved > 1e-3).all()), "the new vectors did not train"
    # the one trained parameter is the two new rows, not the vocabulary (optimizer state and checkpoints follow)
    trainable = [p for p in comps.text_encoder.parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0].shape == (2, new.shape[1])
    assert not any(p.requires_grad for p in comps.unet.parameters())


def test_mixed_precision_keeps_the_rows_fp32_and_the_rest_frozen(tmp_path, tiny_base):
    t = run_trainer(ti_recipe(tmp_path, tiny_base, train={"mixed_precision": "bf16", "max_steps": 2}))
    table = encoder_rows(t.comps)  # the frozen rows live in the compute dtype, like the rest of the encoder
    rows = t.method.tokens.vectors(t.comps)["text_encoder"]  # the trained ones in fp32
    old = encoder_rows(fresh_pipe(tiny_base))
    assert rows.dtype == torch.float32 and table.dtype == torch.bfloat16
    assert torch.equal(table[: old.shape[0]], old.to(torch.bfloat16))
    assert not torch.equal(rows, old[t.comps.tokenizer.convert_tokens_to_ids(["circle</w>"]) * 2])


def test_multi_vector_captions_expand_like_diffusers(tiny_base):
    from diffusers.loaders import TextualInversionLoaderMixin

    from finetune.methods.textual_inversion import TEMPLATES, NewTokens, TextualInversionConfig, expand_token

    assert expand_token("a <sks> dog", TOKEN, 3) == "a <sks> <sks>_1 <sks>_2 dog"
    assert expand_token("a <SKS>_1 dog", TOKEN, 2) == "a <SKS>_1 dog"  # an extra vector's name stays itself
    tok = fresh_pipe(tiny_base).tokenizer
    tok.add_tokens([TOKEN, f"{TOKEN}_1", f"{TOKEN}_2"])
    for prompt in ["a <sks> dog", "<sks>, on a table with a <sks>", "no token"]:
        ours = expand_token(prompt, TOKEN, 3)
        assert ours == TextualInversionLoaderMixin._maybe_convert_prompt(None, prompt, tok)

    cfg = TextualInversionConfig(**TI | {"templates": "style"})
    captions = NewTokens(cfg, "method").prepare_captions(["", "a <sks> circle"])
    assert captions[1] == "a <sks> <sks>_1 circle"
    assert any(captions[0] == t.format("<sks> <sks>_1") for t in TEMPLATES["style"])


def test_training_and_pipeline_encode_the_same_prompt(tiny_base, ti_run):
    """The trainer's captions (prepare_captions + family.encode_prompt) equal diffusers' prompt encoding."""
    t = ti_run
    with torch.no_grad():
        ours = t.encode_text(["a <sks> circle"])["prompt_embeds"]
        theirs, _ = trained_pipe(tiny_base, t).encode_prompt("a <sks> circle", "cpu", 1, False)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("form", ["diffusers", "a1111"])
def test_exported_embedding_loads_in_diffusers(tiny_base, ti_run, form):
    out = Path(ti_run.cfg.output_dir)
    expected = latents(trained_pipe(tiny_base, ti_run), "a <sks> circle")
    pipe = fresh_pipe(tiny_base)
    if form == "diffusers":
        pipe.load_textual_inversion(str(out))  # the folder: learned_embeds.safetensors
    else:
        pipe.load_textual_inversion(str(out / "concept.safetensors"), token=TOKEN)  # emb_params form
    got = latents(pipe, "a <sks> circle")
    assert (got - expected).abs().max() < 1e-5
    assert (got - latents(fresh_pipe(tiny_base), "a circle")).abs().max() > 1e-4  # the word means something
    assert (out / "concept.safetensors").stat().st_size < 10_000


def test_bad_input_is_one_line_naming_the_key(tmp_path, tiny_base):
    cases = [
        (TI | {"token": "circle"}, "method.token: 'circle' is already in the vocabulary"),
        (TI | {"initializer": "checkered"}, "method.initializer: 'checkered' is not a word"),
        (TI | {"num_vectors": 0}, "method.num_vectors: 0 is not valid"),
        (TI | {"token": "my thing"}, "method.token: must be one word"),
        ({**PIVOTAL, "embedding": PIVOTAL["embedding"] | {"token": "sks"}}, "method.embedding.token: 'sks'"),
        (PIVOTAL | {"token_steps": 4}, "method.token_steps (4) leaves no step"),
    ]
    for i, (method, expected) in enumerate(cases):
        path = ti_recipe(tmp_path / str(i), tiny_base, method=method)
        with pytest.raises(RecipeError) as err:
            load_recipe(path)
        assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)
    path = ti_recipe(tmp_path / "drop", tiny_base, data={"caption": {"caption_dropout": 0.1}})
    with pytest.raises(RecipeError, match="method.templates: 'object' fills empty captions"):
        load_recipe(path)
    path = ti_recipe(tmp_path / "fmt", tiny_base, export={"formats": ["kohya"]})
    with pytest.raises(RecipeError, match=r"export.formats \['kohya'\] are not written by method 'textual_inv"):
        load_recipe(path)


def test_setup_checks_the_vocabulary_when_the_recipe_could_not(tiny_base):
    """Hub ids (and single files) have no vocab.json to read at recipe time: set-up says the same thing."""
    from finetune.methods.textual_inversion import NewTokens, TextualInversionConfig

    comps = load_comps(tiny_base)
    for bad, expected in [({"token": "circle"}, "method.token: 'circle' is already"),
                          ({"initializer": "circle checkered"}, "method.initializer: 'checkered' is not a word")]:
        with pytest.raises(UserError) as err:
            NewTokens(TextualInversionConfig(**TI | bad), "method").add(comps)
        assert expected in str(err.value) and "\n" not in str(err.value)


def test_pivotal_trains_tokens_and_lora_and_both_reload(tiny_base, pivotal_run):
    t = pivotal_run
    out = Path(t.cfg.output_dir)
    names = {p.name for p in out.iterdir() if p.suffix in (".safetensors", ".md")}
    assert names == {"pytorch_lora_weights.safetensors", "learned_embeds.safetensors", "piv.safetensors",
                     "piv_emb.safetensors", "README.md"}
    base = fresh_pipe(tiny_base)
    assert digest(t.comps.unet) == digest(base.unet)
    old = encoder_rows(base)
    assert torch.equal(encoder_rows(t.comps)[: old.shape[0]], old)
    expected = latents(trained_pipe(tiny_base, t), "a <sks> circle")
    pipe = fresh_pipe(tiny_base)
    pipe.load_textual_inversion(str(out))
    pipe.load_lora_weights(str(out))
    got = latents(pipe, "a <sks> circle")
    assert (got - expected).abs().max() < 1e-5
    lora_only = fresh_pipe(tiny_base)
    lora_only.load_lora_weights(str(out))
    lora_only.load_textual_inversion(str(out / "piv_emb.safetensors"), token=TOKEN)  # the A1111 form, other order
    assert (latents(lora_only, "a <sks> circle") - expected).abs().max() < 1e-5
    from finetune.export.io import read_metadata

    for f in ("pytorch_lora_weights.safetensors", "piv.safetensors", "piv_emb.safetensors"):
        assert json.loads(read_metadata(out / f)["finetune.trigger_words"]) == [TOKEN], f
    card = (out / "README.md").read_text()
    assert "`<sks>`" in card and "load_textual_inversion" in card and "load_lora_weights" in card


def test_pivotal_phases_hold_the_other_part_still(tmp_path, tiny_base, monkeypatch):
    """token_steps: 2 of 4: the LoRA stays at its start for 2 steps, then the tokens stay where they got."""
    from finetune.methods.pivotal import PivotalMethod

    seen = []
    original = PivotalMethod.after_step

    def recording(self, comps):
        original(self, comps)
        lora_b = max(float(p.detach().abs().max()) for n, p in comps.unet.named_parameters() if "lora_B" in n)
        seen.append((comps.extras["step"] + 1, lora_b, self.tokens.vectors(comps)["text_encoder"].clone()))

    monkeypatch.setattr(PivotalMethod, "after_step", recording)
    run_trainer(ti_recipe(tmp_path, tiny_base, method=PIVOTAL | {"token_steps": 2}))
    assert [s for s, _, _ in seen] == [1, 2, 3, 4]
    assert seen[0][1] == 0.0 and seen[1][1] == 0.0, "the LoRA moved during the token phase"
    assert seen[3][1] > 0, "the LoRA did not train after the pivot"
    assert not torch.equal(seen[0][2], seen[1][2]), "the tokens did not train in their phase"
    assert torch.equal(seen[1][2], seen[2][2]) and torch.equal(seen[2][2], seen[3][2]), "tokens moved after the pivot"


def test_pivotal_resume_after_the_pivot_is_exact(tmp_path, tiny_base):
    """Resuming in the LoRA phase keeps the tokens still and gives the uninterrupted run's weights."""
    from safetensors.torch import load_file

    recipe = ti_recipe(tmp_path, tiny_base, method=PIVOTAL | {"token_steps": 2},
                       train={"max_steps": 5, "checkpoint_every": 3}, export={"formats": ["diffusers"]})
    t = run_trainer(recipe)
    out = Path(t.cfg.output_dir)
    files = ("learned_embeds.safetensors", "pytorch_lora_weights.safetensors")
    straight = {f: load_file(out / f) for f in files}
    resumed = run_trainer(recipe, "train.resume=latest")  # from the step-3 checkpoint, after the pivot
    assert resumed.state.step == 5
    for f in files:
        again = load_file(out / f)
        assert all(torch.equal(again[k], v) for k, v in straight[f].items()), f


# ---------------------------------------------------------------------------------- learning (toy base)

EVAL_SEEDS = range(8)


def toy_train(name: str, tmp_path: Path, *overrides: str) -> Path:
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "toy" / f"{name}.yaml"
    t = run_trainer(recipe, f"train.output_dir={tmp_path / name}", "validation.prompts=[]", "validation.metrics=[]",
                    "logging.report_to=[]",
                    "logging.progress=false", "train.checkpoint_every=0", *overrides)
    return Path(t.cfg.output_dir)


def similarity(pipe, prompt: str, subject: str) -> float:
    from finetune.toy import evaluate, score

    images = evaluate.generate(pipe, [prompt], EVAL_SEEDS, steps=20, guidance=5.0)
    return float(score.score_images(images, subject=subject)["subject_similarity"])


def toy_pipe():
    from finetune.toy import evaluate, toy_base_path

    return evaluate.load_pipeline(toy_base_path())


@pytest.mark.slow
def test_toy_textual_inversion_learns_the_subject(tmp_path):
    out = toy_train("textual_inversion", tmp_path)
    subject = load_recipe(out / "recipe.yaml").data.sources[0].subject
    base = toy_pipe()
    before = similarity(base, "a heart", subject)  # the initializer word: where the vectors started
    pipe = toy_pipe()
    pipe.load_textual_inversion(str(out))
    after = similarity(pipe, "a <sks>", subject)
    print(f"textual inversion on {subject}: initializer 'a heart' {before:.3f} -> 'a <sks>' {after:.3f}")
    assert after > before + 0.1 and after > 1.5 * before


@pytest.mark.slow
def test_toy_pivotal_is_at_least_as_good_as_lora_alone(tmp_path):
    pivotal = toy_train("pivotal", tmp_path)
    lora = toy_train("lora", tmp_path)  # same subject, steps, rank, targets and LoRA learning rate
    subject = load_recipe(pivotal / "recipe.yaml").data.sources[0].subject
    assert load_recipe(lora / "recipe.yaml").data.sources[0].subject == subject
    piv_pipe = toy_pipe()
    piv_pipe.load_textual_inversion(str(pivotal))
    piv_pipe.load_lora_weights(str(pivotal))
    lora_pipe = toy_pipe()
    lora_pipe.load_lora_weights(str(lora))
    piv, alone = similarity(piv_pipe, "a <sks>", subject), similarity(lora_pipe, "a sks heart", subject)
    print(f"{subject}: pivotal {piv:.3f}, LoRA alone {alone:.3f}")
    assert piv >= alone - 0.02
