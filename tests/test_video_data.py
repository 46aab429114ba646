"""Video data: video files (PyAV) and frame folders with captions, frame sampling (rate, 4k+1 counts, head /
uniform / several clips, shorter frame buckets), spatio-temporal buckets with images as one-frame clips, per-clip
latent cache keys that follow the sampling settings, and every bad video as one line before any model loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, draw_images, write_recipe


def clip_frames(n: int, size: int = 64, seed: int = 0):
    """`n` frames of a red disc moving right, as PIL images."""
    from PIL import Image, ImageDraw

    frames = []
    for i in range(n):
        im = Image.new("RGB", (size, size), "white")
        x = 4 + (i * 3 + seed) % (size - 24)
        ImageDraw.Draw(im).ellipse([x, 20, x + 20, 40], fill=(220, 30, 30))
        frames.append(im)
    return frames


def write_videos(folder: Path, n: int = 3, frames: int = 18, fps: int = 8, ext: str = ".mp4",
                 caption: str = "a red circle moving right", stem: str = "v") -> Path:
    from finetune.eval.video import save_gif, save_mp4

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        clip = clip_frames(frames, seed=i)
        if ext == ".gif":
            save_gif([clip], folder / f"{stem}{i}.gif", fps)
        else:
            save_mp4(clip, folder / f"{stem}{i}{ext}", fps)
        (folder / f"{stem}{i}.txt").write_text(caption)
    return folder


def video_data(path: Path, **video) -> dict:
    return {"sources": [{"type": "video", "path": str(path)}], "resolution": 64, "buckets": {"enabled": False},
            "video": {"frames": 9, "fps": 8, **video}}


@pytest.fixture(scope="module")
def wan_base(tmp_path_factory) -> Path:
    from finetune.models.tiny import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("wan") / "t2v")


def wan_recipe(tmp_path: Path, base: Path, data: dict) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return write_recipe(tmp_path, base, tmp_path, data=data, method={"targets": "attention"},
                        model={"max_sequence_length": 16})


def scan(tmp_path: Path, data: dict, base: Path):
    from finetune.data.scan import scan_data
    from finetune.recipe import load_recipe

    return scan_data(load_recipe(wan_recipe(tmp_path, base, data)).data, verbose=False)


# ----------------------------------------------------------------------------------------------- sampling
def test_clip_indices_follow_rate_count_and_mode():
    from finetune.data.config import VideoSection
    from finetune.data.video import BadVideo, VideoInfo, clip_indices

    info = VideoInfo(frames=100, fps=24.0, size=(64, 64))
    head = clip_indices(info, VideoSection(frames=5, fps=8))
    assert head == [(0, 3, 6, 9, 12)]  # every third source frame: 24 fps -> 8 fps
    assert clip_indices(info, VideoSection(frames=5, fps=16)) == [(0, 2, 3, 4, 6)]  # 1.5 frames a step, rounded
    assert clip_indices(info, VideoSection(frames=5, sampling="uniform")) == [(0, 25, 50, 74, 99)]
    clips = clip_indices(info, VideoSection(frames=5, fps=8, sampling="clips", clips=3))
    assert [c[0] for c in clips] == [0, 44, 87] and all(c[-1] <= 99 and len(c) == 5 for c in clips)
    short = VideoInfo(frames=20, fps=8.0, size=(64, 64))
    assert clip_indices(short, VideoSection(frames=33, fps=8, frame_buckets=[9, 17])) == [tuple(range(17))]
    with pytest.raises(BadVideo, match="has 20 frame\\(s\\); a clip needs 33 at 8 fps"):
        clip_indices(short, VideoSection(frames=33, fps=8))
    with pytest.raises(BadVideo, match="runs at 8 fps; data.video.fps 24 would repeat frames"):
        clip_indices(short, VideoSection(frames=5, fps=24))


def test_video_files_and_gifs_become_clips_with_captions(tmp_path, wan_base):
    videos = write_videos(tmp_path / "mp4", n=2, frames=18)
    write_videos(tmp_path / "mp4", n=1, frames=18, ext=".gif", caption="a gif", stem="g")
    s = scan(tmp_path, video_data(videos, sampling="clips", clips=2), wan_base)
    recs = s.subsets[0].records
    assert len(recs) == 6 and {r.frames for r in recs} == {9}
    assert recs[0].key.endswith("g0.gif#clip0") and recs[0].caption == "a gif"
    assert recs[1].clip == tuple(range(9, 18)) and recs[2].caption == "a red circle moving right"
    assert set(s.assigned[0]) == {(64, 64, 9)}


def test_frame_folders_images_and_buckets(tmp_path, wan_base):
    """A frame folder is one clip at its source's fps; an image source beside it is a one-frame clip; clips
    of different lengths (frame_buckets) land in different spatio-temporal buckets."""
    from finetune.data.dataset import Render

    root = tmp_path / "frames"
    for k, n in enumerate((9, 6)):
        d = root / f"clip{k}"
        d.mkdir(parents=True)
        for i, f in enumerate(clip_frames(n)):
            f.save(d / f"{i:03d}.png")
        (root / f"clip{k}.txt").write_text(f"clip {k}")
    images = draw_images(tmp_path / "images", n=2)
    data = {"sources": [{"type": "frames", "path": str(root), "fps": 8}, {"type": "folder", "path": str(images)}],
            "resolution": 64, "buckets": {"enabled": False}, "video": {"frames": 9, "fps": 8, "frame_buckets": [5]}}
    s = scan(tmp_path, data, wan_base)
    assert [r.frames for r in s.subsets[0].records] == [9, 5] and s.assigned[0] == [(64, 64, 9), (64, 64, 5)]
    assert s.assigned[1] == [(64, 64, 1), (64, 64, 1)] and s.subsets[0].records[0].caption == "clip 0"
    render = Render(s.subsets[0].records + s.subsets[1].records, "center", None, "", False, None, "")
    clip, _, _ = render.pixels(0, (64, 64, 9))
    image, _, _ = render.pixels(2, (64, 64, 1))
    assert clip.shape == (3, 9, 64, 64) and image.shape == (3, 1, 64, 64)
    assert clip.min() >= -1 and clip.max() <= 1 and not torch.equal(clip[:, 0], clip[:, 8])  # it moves


def test_latent_cache_keys_follow_the_sampling_settings(tmp_path, wan_base):
    from finetune.data.dataset import Render

    videos = write_videos(tmp_path / "v", n=1, frames=18)
    keys = {}
    for name, video in (("head", {}), ("fps4", {"fps": 4}), ("uniform", {"sampling": "uniform"}),
                        ("frames5", {"frames": 5})):
        s = scan(tmp_path / name, video_data(videos, **video), wan_base)
        render = Render(s.subsets[0].records, "center", None, "vae", False, None, "")
        keys[name] = render.latent_entry(0, s.assigned[0][0])
    assert len(set(keys.values())) == 4, keys
    again = scan(tmp_path / "again", video_data(videos), wan_base)
    assert Render(again.subsets[0].records, "center", None, "vae", False, None, "").latent_entry(
        0, again.assigned[0][0]) == keys["head"]


# ----------------------------------------------------------------------------------------------- bad inputs
def bad_case(tmp_path: Path, case: str) -> tuple[Path, list[str]]:
    from finetune.eval.video import save_mp4

    folder = tmp_path / "videos"
    write_videos(folder, n=1, frames=18)
    overrides = []
    if case == "zero-length":
        (folder / "bad.mp4").write_bytes(b"")
    elif case == "corrupt":
        (folder / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    elif case == "one-frame":
        save_mp4(clip_frames(1), folder / "bad.mp4", fps=16)
        save_mp4(clip_frames(81), folder / "v0.mp4", fps=16)  # the good one fills 81 frames
        overrides = ["data.video.frames=81", "data.video.fps=null"]
    elif case == "odd-fps":
        save_mp4(clip_frames(18), folder / "bad.mp4", fps=4)
    elif case == "huge":
        save_mp4([f.resize((4160, 64)) for f in clip_frames(1)], folder / "bad.mp4", fps=8)
    return folder, overrides


EXPECTED = {"zero-length": "is empty (0 bytes)", "corrupt": "cannot be decoded",
            "one-frame": "has 1 frame(s); a clip needs 81", "odd-fps": "runs at 4 fps; data.video.fps 8 would repeat",
            "huge": "is 4160x64, larger than data.video.max_side 4096"}


@pytest.mark.parametrize("case", list(EXPECTED))
def test_bad_video_is_one_line_before_any_model_loads(tmp_path, wan_base, case):
    folder, overrides = bad_case(tmp_path, case)
    recipe = wan_recipe(tmp_path, wan_base, video_data(folder))
    cmd = [sys.executable, "-m", "finetune", str(recipe), *overrides]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert str(folder / "bad.mp4") in lines[-1] and EXPECTED[case] in lines[-1], lines[-1]
    assert "Loading pipeline components" not in done.stderr and not (tmp_path / "out").exists()
    skipped = subprocess.run([*cmd, "data.on_bad_image=skip", "train.max_steps=1", "logging.progress=true"], cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert f"warning: skipping {folder / 'bad.mp4'}" in skipped.stderr


def test_video_sources_need_a_video_section_and_a_video_family(tmp_path, wan_base):
    from finetune.errors import RecipeError
    from finetune.recipe import load_recipe

    videos = write_videos(tmp_path / "v", n=1)
    data = video_data(videos)
    del data["video"]
    with pytest.raises(RecipeError, match="add a data.video section"):
        load_recipe(wan_recipe(tmp_path, wan_base, data))
    with pytest.raises(RecipeError, match="data.video.frames: 8 frames; .* use 5 or 9"):
        load_recipe(wan_recipe(tmp_path, wan_base, video_data(videos, frames=8)))
    with pytest.raises(RecipeError, match="the sd1 family makes images, not clips"):
        load_recipe(write_recipe(tmp_path, "toy", videos, data=video_data(videos), method={"targets": "attention"}))
