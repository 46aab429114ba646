"""Video validation: clips rendered as frame strips, a GIF and MP4s, scored by CLIP-T per frame and temporal
consistency (finetune/eval/video.py), and shown in the model card."""

from __future__ import annotations

import json

import pytest

from tests.helpers import write_recipe


@pytest.fixture(scope="module")
def clip_model():
    from finetune.eval.embedders import load_clip

    return load_clip("toy")


def test_temporal_consistency_is_one_for_a_still_clip_and_lower_for_a_changing_one(clip_model):
    from finetune.eval.video import temporal_consistency
    from finetune.toy.video_world import motion_clips, world_clips

    still = [world_clips(1, 3)[0][0][0]] * 9
    moving = world_clips(1, 3)[0][0]
    changing = [f for (clip, _) in world_clips(9, 4) for f in clip[:1]]  # a different shape every frame
    tc = {name: temporal_consistency(clip_model, c) for name, c in (("still", still), ("moving", moving), ("changing", changing))}
    assert tc["still"] == pytest.approx(1.0, abs=1e-5)
    assert tc["changing"] < tc["moving"] < tc["still"], tc
    shrinking = motion_clips("shrinking", 1)[0][0]
    assert 0.0 < temporal_consistency(clip_model, shrinking) < 1.0


def test_clip_t_is_per_frame(clip_model):
    from finetune.eval.video import clip_t_per_frame
    from finetune.toy.video_world import motion_clips

    clip, caption = motion_clips("moving left", 1)[0]
    per = clip_t_per_frame(clip_model, clip, caption)
    from torch.nn.functional import normalize

    image = normalize(clip_model.images(clip[:1]), dim=-1) @ normalize(clip_model.texts([caption]), dim=-1).T
    assert len(per) == len(clip) and per[0] == pytest.approx(float(image), abs=1e-5)


def test_video_run_writes_clips_metrics_and_card(tmp_path):
    """A Wan run on toy clips with metrics: the grid (frame strips), a GIF of every sample and an MP4 per prompt,
    CLIP-T over every frame and temporal consistency per step in metrics.json, the GIF and an MP4-writing
    snippet in the model card."""
    import av
    from PIL import Image

    from finetune.models.tiny import build_tiny_wan
    from tests.helpers import run_trainer

    base = build_tiny_wan(tmp_path / "wan", "experts")
    recipe = write_recipe(
        tmp_path, base, tmp_path, model={"max_sequence_length": 16}, method={"targets": "attention"},
        data={"sources": [{"type": "toy_video", "count": 4}], "video": {"frames": 5, "fps": 16}},
        train={"max_steps": 2}, export={"formats": ["diffusers", "kohya"], "model_card": True},
        validation={"prompts": ["a red circle moving left", "a blue square growing"], "seeds": [0, 1], "steps": 2,
                    "at_start": True, "metrics": ["clip_t"], "clip_model": "toy"})
    run_trainer(recipe)
    samples = tmp_path / "out" / "samples"
    strip = Image.open(samples / "step-000002.png")
    gif = Image.open(samples / "step-000002.gif")
    assert strip.width == 5 * 64 and gif.n_frames == 5 and gif.size == (2 * 64, 2 * 64)
    with av.open(str(samples / "step-000002-prompt1.mp4")) as mp4:
        assert sum(1 for _ in mp4.decode(video=0)) == 5
    metrics = json.loads((samples / "metrics.json").read_text())
    assert set(metrics["temporal_consistency"]) == {"0", "2"} and "clip_t" in metrics["steps"]["2"]["overall"]
    assert all(0 < v <= 1 for v in metrics["temporal_consistency"].values())
    card = (tmp_path / "out" / "README.md").read_text()
    assert "![sample clips](samples/step-000002.gif)" in card and "export_to_video(video" in card
    assert 'weight_name="pytorch_lora_weights_low_noise.safetensors", load_into_transformer_2=True' in card
    assert "out_low_noise.safetensors` is the low-noise expert's LoRA" in card


def test_image_to_video_validation_starts_from_a_training_frame(tmp_path):
    """Wan I2V: validation clips start from the first frame of the first training clip (the pipeline needs an
    image), and the clips come out as frame strips and a GIF."""
    from PIL import Image

    from finetune.models.tiny import build_tiny_wan
    from tests.helpers import run_trainer

    base = build_tiny_wan(tmp_path / "wan", "i2v")
    recipe = write_recipe(
        tmp_path, base, tmp_path, model={"max_sequence_length": 16}, method={"targets": "attention"},
        data={"sources": [{"type": "toy_video", "count": 2}], "video": {"frames": 5, "fps": 16}},
        train={"max_steps": 1, "batch_size": 1},
        validation={"prompts": ["a red circle moving left"], "seeds": [0], "steps": 2, "at_start": False})
    t = run_trainer(recipe)
    from finetune.train.loop import start_image

    first = start_image(t)
    assert first.size == (64, 64)
    gif = Image.open(tmp_path / "out" / "samples" / "step-000001.gif")
    assert gif.n_frames == 5
