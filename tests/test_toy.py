"""The toy world, its scorer, the toy_data CLI and the committed toy base model."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from finetune.errors import DataError
from finetune.toy import score, toy_base_path, world

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _targets(caption: str) -> tuple[str, str]:
    colour, shape = score.prompt_targets(caption)
    assert colour and shape, caption
    return colour, shape


# ---------------------------------------------------------------------------------------------- world
def test_toy_modules_do_not_import_torch():
    code = "import sys, finetune.toy, finetune.toy.world, finetune.toy.score; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_world_is_deterministic_from_seed():
    a, b, c = world.world_images(6, seed=3), world.world_images(6, seed=3), world.world_images(6, seed=4)
    assert [cap for _, cap in a] == [cap for _, cap in b]
    assert np.array_equal(world.to_array([i for i, _ in a]), world.to_array([i for i, _ in b]))
    assert not np.array_equal(world.to_array([i for i, _ in a]), world.to_array([i for i, _ in c]))
    s1, s2 = (
        world.subject_images("checkered_heart", 3, seed=1),
        world.subject_images("checkered_heart", 3, seed=1),
    )
    assert np.array_equal(world.to_array([i for i, _ in s1]), world.to_array([i for i, _ in s2]))


def test_world_images_are_captioned_64px_and_never_show_a_subject():
    items = world.world_images(300, seed=0, variants=True)
    assert all(img.size == (64, 64) and img.mode == "RGB" for img, _ in items)
    words = {w for _, cap in items for w in cap.replace(",", " ").split()}
    assert {"heart", "checkered", "striped", "magenta", "cyan"}.isdisjoint(words)
    assert set(world.COLOURS) <= words and set(world.SHAPES) <= words
    assert any(len(cap.split()) == 3 for _, cap in items), "short prompts like 'a red circle' are trained on"


def test_subjects_have_instance_and_class_images():
    for name, subj in world.SUBJECTS.items():
        inst = world.subject_images(name, 4)
        assert all(f"{subj.description} {subj.class_word}" in cap for _, cap in inst)
        cls = world.class_images(name, 4)
        assert all(cap.split()[2] == subj.class_word for _, cap in cls)


def test_unknown_subject_is_a_data_error_with_did_you_mean():
    with pytest.raises(DataError, match="did you mean 'red_heart'"):
        world.subject_images("red_hart", 2)
    with pytest.raises(DataError):
        world.class_images("unicorn", 2)


# ---------------------------------------------------------------------------------------------- scorer
def test_scorer_reads_colour_and_shape_of_drawn_world_images():
    items = world.world_images(150, seed=11)
    colour_ok = np.mean([score.colour_of(img) == _targets(cap)[0] for img, cap in items])
    shape_ok = np.mean([score.shape_of(img) == _targets(cap)[1] for img, cap in items])
    assert colour_ok >= 0.98 and shape_ok >= 0.95, (colour_ok, shape_ok)
    summary = score.score_images([i for i, _ in items[:40]], [c for _, c in items[:40]])
    assert summary["colour_acc"] >= 0.95 and summary["shape_acc"] >= 0.95


def test_scorer_tells_a_heart_from_a_circle():
    hearts = [img for img, _ in world.subject_images("red_heart", 20, seed=5)]
    circles = [world.draw("circle", "red", "white", 32, 32, r) for r in (12, 16, 20, 24)]
    assert np.mean([score.shape_of(h) == "heart" for h in hearts]) >= 0.95
    assert all(score.shape_of(c) == "circle" for c in circles)
    assert score.shape_of(world.draw("circle", "red", "white", r=0.5)) == "none"


@pytest.mark.parametrize("name", list(world.SUBJECTS))
def test_subject_similarity_is_high_for_instances_and_low_for_unrelated(name):
    inst = [score.subject_similarity(img, name) for img, _ in world.subject_images(name, 12, seed=7)]
    other = [score.subject_similarity(img, name) for img, _ in world.world_images(40, seed=8)]
    assert all(0.0 <= s <= 1.0 for s in inst + other)
    assert np.mean(inst) >= 0.75 and min(inst) >= 0.5, inst
    assert np.mean(other) <= 0.05 and max(other) < 0.3, max(other)
    for other_name in world.SUBJECTS:
        if other_name != name:
            others = [score.subject_similarity(i, name) for i, _ in world.subject_images(other_name, 4)]
            assert max(others) < 0.2, (other_name, others)


# ---------------------------------------------------------------------------------------------- toy_data CLI
def _toy_data(*args):
    cmd = [sys.executable, str(ROOT / "tools" / "toy_data.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)


def test_toy_data_writes_images_and_same_stem_captions(tmp_path):
    out = _toy_data("subject", "checkered_heart", "--n", 3, "--out", tmp_path / "inst", "--token", "sks")
    assert out.returncode == 0, out.stderr
    pngs, txts = sorted((tmp_path / "inst").glob("*.png")), sorted((tmp_path / "inst").glob("*.txt"))
    assert [p.stem for p in pngs] == [t.stem for t in txts] and len(pngs) == 3
    assert txts[0].read_text().startswith("a sks heart on a ")
    assert _toy_data("world", "--n", 2, "--out", tmp_path / "w").returncode == 0
    assert len(list((tmp_path / "w").glob("*.txt"))) == 2


def test_toy_data_rejects_an_unknown_subject_with_exit_2(tmp_path):
    out = _toy_data("subject", "checkered_hart", "--out", tmp_path / "x")
    assert out.returncode == 2
    assert "did you mean 'checkered_heart'" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------- base model
@pytest.fixture(scope="module")
def pipe():
    import torch
    from diffusers import StableDiffusionPipeline

    if not (toy_base_path() / "model_index.json").exists():
        pytest.fail(f"no committed toy base at {toy_base_path()}; build it with tools/make_toy_model.py")
    return StableDiffusionPipeline.from_pretrained(toy_base_path(), torch_dtype=torch.float32)


def test_base_is_a_standard_sd_folder(pipe):
    files = {p.relative_to(toy_base_path()).as_posix() for p in toy_base_path().rglob("*") if p.is_file()}
    assert {
        "model_index.json",
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
    } <= files
    assert not any(f.endswith((".bin", ".ckpt", ".pt", ".pth")) for f in files), "safetensors only"
    assert sum((toy_base_path() / f).stat().st_size for f in files) < 25e6
    assert pipe.vae.config.latent_channels == 4 and pipe.unet.config.cross_attention_dim == 64
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.safety_checker is None and pipe.unet.dtype.is_floating_point
    assert pipe.tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]  # real CLIP BPE ids


def test_base_vae_latents_are_standardised_and_reconstruct(pipe):
    import torch

    from finetune.toy.build import to_tensor

    x = to_tensor(world.to_array(world.vae_images(64, seed=99)))
    with torch.no_grad():
        z = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        rec = pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample
    assert abs(z.mean().item()) < 0.25 and 0.7 < z.std().item() < 1.3
    psnr = 10 * np.log10(4.0 / torch.mean((rec - x) ** 2).item())
    assert psnr > 22.0, psnr


def test_base_generates_through_the_standard_pipeline(pipe):
    import torch

    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    out = pipe(
        ["a red circle", "a blue square"],
        num_inference_steps=12,
        guidance_scale=6.0,
        generator=gens,
        height=64,
        width=64,
        output_type="pil",
    )
    assert [im.size for im in out.images] == [(64, 64)] * 2
    arr = world.to_array(out.images)
    assert arr.std() > 10, "a blank image means the denoiser produced nothing"
    assert [score.colour_of(im) for im in out.images] == ["red", "blue"]
