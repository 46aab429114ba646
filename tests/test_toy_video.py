"""The toy video world and its scorer: deterministic clips, motions the centroid tracker reads back from the
drawn clips, and a held-out motion the world never shows."""

from __future__ import annotations

import pytest

from finetune.toy import video_world
from finetune.toy.video_score import motion_of, score_clip, smoothness


def test_clips_are_deterministic_and_captioned():
    a, b = video_world.world_clips(6, 3), video_world.world_clips(6, 3)
    assert [c for _, c in a] == [c for _, c in b]
    assert all(video_world.to_array(x).tobytes() == video_world.to_array(y).tobytes()
               for (x, _), (y, _) in zip(a, b, strict=True))
    assert all(len(frames) == video_world.FRAMES and frames[0].size == (64, 64) for frames, _ in a)
    captions = [c for _, c in video_world.world_clips(300, 0)]
    assert not any("shrinking" in c for c in captions)  # held out of the base's world
    for motion in video_world.MOTIONS[:5]:
        assert any(c.endswith(motion) for c in captions), motion
    assert any(" turning " in c for c in captions)


@pytest.mark.parametrize("motion", [*video_world.MOTIONS[:5], "shrinking"])
def test_scorer_reads_each_drawn_motion_back(motion):
    clips = video_world.motion_clips(motion, 12, seed=1)
    scores = [score_clip(frames, caption) for frames, caption in clips]
    assert sum(s["motion_ok"] for s in scores) >= 11, [s["motion"] for s in scores]
    assert sum(s["colour_ok"] for s in scores) >= 11 and sum(s["shape_ok"] for s in scores) >= 10


def test_scorer_tells_still_and_jumping_clips_apart():
    frames, _ = video_world.motion_clips("moving right", 1, seed=2)[0]
    still = [frames[0]] * len(frames)
    assert motion_of(still) == "still" and motion_of(frames) == "moving right"
    jumping = [frames[i] for i in (0, 8, 1, 7, 2, 6, 3, 5, 4)]
    assert smoothness(frames) > 0.9 > smoothness(jumping) + 0.3


def test_unknown_motion_is_one_line():
    from finetune.errors import DataError

    with pytest.raises(DataError, match="unknown toy motion 'spinning' .*; choose one of: moving left"):
        video_world.motion_clips("spinning", 1)


def test_a_toy_base_not_built_here_is_one_line_naming_its_build(monkeypatch, tmp_path):
    import finetune.toy
    from finetune.models.base import resolve_base

    monkeypatch.setattr(finetune.toy, "toy_path", lambda name: tmp_path / "base_video" if name == "toy-video" else None)
    problem = resolve_base("toy-video").problem
    assert problem is not None and "\n" not in problem
    assert problem.startswith("model.base 'toy-video': this toy base is not built") and \
        problem.endswith("`python tools/make_toy_model.py --video` (docs/toy.md)"), problem
    (tmp_path / "base_video").mkdir()
    (tmp_path / "base_video" / "model_index.json").write_text("{}")  # built (an empty index: detection's problem)
    assert "not built" not in (resolve_base("toy-video").problem or "")


def test_the_committed_base_loads_in_a_stock_wan_pipeline_and_samples_a_clip():
    import torch
    from diffusers import WanPipeline

    from finetune.models.base import resolve_base
    from finetune.toy import build_video, toy_path

    assert resolve_base("toy-video").problem is None
    pipe = WanPipeline.from_pretrained(toy_path("toy-video"), torch_dtype=torch.float32)
    assert {k: pipe.transformer.config[k] for k in build_video.TRANSFORMER_CONFIG} == \
        {k: list(v) if isinstance(v, tuple) else v for k, v in build_video.TRANSFORMER_CONFIG.items()}
    assert len(pipe.vae.config.latents_std) == build_video.LATENT_CHANNELS and min(pipe.vae.config.latents_std) > 0
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle moving left", height=64, width=64, num_frames=video_world.FRAMES, num_inference_steps=2,
               guidance_scale=1.0, max_sequence_length=build_video.MAX_SEQUENCE_LENGTH, output_type="np",
               generator=torch.Generator().manual_seed(0)).frames
    assert out.shape == (1, video_world.FRAMES, 64, 64, 3) and 0.0 <= out.min() <= out.max() <= 1.0
    assert out.std() > 0.05  # a picture, not a flat field
