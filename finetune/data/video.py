"""Video clips: probing and decoding video files (PyAV, which carries its own FFmpeg) and frame folders, and
choosing which frames make each training clip. No torch here (`--check` uses it).

A source video has N frames at its own rate S (frames per second); `data.video` asks for clips of `frames`
frames at `fps` (null: the source's rate), taken one of three ways:

- head: the first `frames` frames at that rate;
- uniform: `frames` frames spread evenly over the whole video (the rate ignored);
- clips: `clips` clips of `frames` frames at that rate, their starts spread evenly over the video.

A clip's frames are source frame indices (rounded to the nearest frame when the rates do not divide). A video
too short for `frames` frames takes the longest of `frame_buckets` it can fill; shorter than all of them, it is a
bad input. Images are one-frame clips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

VIDEO_EXTS = frozenset({".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif", ".m4v"})
FRAME_EXTS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
MAX_FPS = 240.0


class BadVideo(Exception):
    """The video (or frame folder) is not usable; the message says why (the caller adds its name)."""


@dataclass(frozen=True)
class VideoInfo:
    frames: int  # frames in the source
    fps: float  # the source's rate
    size: tuple[int, int]  # (h, w)


def probe_video(path: str | Path, max_side: int) -> VideoInfo:
    """Open a video file, count its frames by demuxing every packet and decode its first frame: a truncated or
    corrupt container fails here, at scan time, not in the middle of training."""
    import av

    path = Path(path)
    if path.stat().st_size == 0:
        raise BadVideo("is empty (0 bytes)")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BadVideo("holds no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
            size = (stream.height, stream.width)
            _check_geometry(size, fps, max_side)
            frames = sum(1 for p in container.demux(stream) if p.size)
            container.seek(0)
            first = next(container.decode(stream), None)
    except BadVideo:
        raise
    except (av.error.FFmpegError, OSError, ValueError, StopIteration) as e:
        raise BadVideo(f"cannot be decoded ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if first is None or frames == 0:
        raise BadVideo("has no decodable frame")
    return VideoInfo(frames, fps, size)


def _check_geometry(size: tuple[int, int], fps: float, max_side: int) -> None:
    h, w = size
    if min(h, w) < 1:
        raise BadVideo("has no pixels")
    if max(h, w) > max_side:
        raise BadVideo(f"is {w}x{h}, larger than data.video.max_side {max_side} px a side; downscale it first "
                       "(decoding every frame at that size would take GBs per clip)")
    if not math.isfinite(fps) or fps <= 0 or fps > MAX_FPS:
        raise BadVideo(f"reports {fps:g} fps, not a usable frame rate (0 < fps <= {MAX_FPS:g}); re-encode it with "
                       "a constant frame rate")


def frame_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_EXTS and not p.name.startswith("."))


def decode_video(path: str | Path, indices: tuple[int, ...]) -> list[Image.Image]:
    """The frames at `indices` (sorted, repeats allowed) as RGB images, decoding once from the start."""
    import av

    wanted = sorted(set(indices))
    got: dict[int, Image.Image] = {}
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                got[i] = frame.to_image().convert("RGB")
            if i >= wanted[-1]:
                break
    missing = [i for i in wanted if i not in got]
    if missing:
        raise BadVideo(f"ended before frame {missing[0]} (it changed since the data was scanned?)")
    return [got[i] for i in indices]


def decode_strip(data: bytes, total: int, indices: tuple[int, ...]) -> list[Image.Image]:
    """Frames tiled left to right in one image (how toy clips are kept in memory)."""
    import io

    strip = Image.open(io.BytesIO(data)).convert("RGB")
    w = strip.width // total
    return [strip.crop((i * w, 0, (i + 1) * w, strip.height)) for i in indices]


def encode_strip(frames: list[Image.Image]) -> bytes:
    import io

    from finetune.eval.video import strip

    buf = io.BytesIO()
    strip(frames).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- sampling
def frame_step(source_fps: float, fps: float | None) -> float:
    """Source frames per clip frame; refuses a target rate above the source's (it would repeat frames)."""
    if fps is None:
        return 1.0
    if fps > source_fps * 1.001:
        raise BadVideo(f"runs at {source_fps:g} fps; data.video.fps {fps:g} would repeat frames: set it to "
                       f"{source_fps:g} or lower, or null for the source's own rate")
    return source_fps / fps


def clip_indices(info: VideoInfo, cfg) -> list[tuple[int, ...]]:
    """The clips `cfg` (the recipe's data.video) takes from a video, as source frame indices."""
    if cfg.sampling == "uniform":
        n = _fitting(info.frames, cfg, step=1.0)
        last = info.frames - 1
        return [tuple(round(i * last / max(n - 1, 1)) for i in range(n))]
    step = frame_step(info.fps, cfg.fps)
    n = _fitting(info.frames, cfg, step, fps=info.fps)
    span = (n - 1) * step
    count = cfg.clips if cfg.sampling == "clips" else 1
    room = info.frames - 1 - span
    starts = [room * k / max(count - 1, 1) if count > 1 else 0.0 for k in range(count)]
    return list(dict.fromkeys(tuple(round(s + i * step) for i in range(n)) for s in starts))


def _fitting(total: int, cfg, step: float, fps: float | None = None) -> int:
    """The longest allowed clip length (data.video.frames, else the longest of frame_buckets) that fits."""
    for n in sorted({cfg.frames, *(cfg.frame_buckets or [])}, reverse=True):
        if round((n - 1) * step) < total:
            return n
    need = min({cfg.frames, *(cfg.frame_buckets or [])})
    at = f" at {cfg.fps:g} fps" if cfg.fps and fps else ""
    raise BadVideo(f"has {total} frame(s); a clip needs {need}{at}: use a longer video, or allow shorter clips "
                   "(data.video.frame_buckets: [..., 4k+1 counts], or lower data.video.frames / fps)")


def clip_pixels(frames: list[Image.Image], rh: int, rw: int) -> np.ndarray:
    """uint8 [F, rh, rw, 3]: every frame resized to cover its bucket (the image path's resize, per frame)."""
    from finetune.data.images import resize

    return np.stack([resize(f, rh, rw) for f in frames])
