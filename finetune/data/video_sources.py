"""Video sources: folders of video files, folders of frame folders, and toy clips; each clip a record. PyAV and
PIL only, no torch.

A video gives one record per clip `data.video` takes from it (finetune/data/video.py), keyed
'<file>#clip<k>' when there are several; the clip's frame indices are part of the record, so they reach the
latent cache key and the dataset fingerprint. A video that cannot be used (empty, corrupt, too short for a
clip, an odd frame rate, a huge frame) is one line naming it, or skipped with data.on_bad_image: skip.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

from finetune.data.records import Problems, Record, Subset, inside, need_dir, read_caption
from finetune.data.video import (
    VIDEO_EXTS,
    BadVideo,
    VideoInfo,
    clip_indices,
    decode_strip,
    encode_strip,
    frame_files,
    probe_video,
)
from finetune.errors import DataError


def _subset(src, data) -> Subset:
    return Subset(name=src.name or getattr(src, "path", None) or f"toy_video:{src.motion}", kind=src.type,
                  repeats=src.repeats, rules=data.caption_rules(src))


def _caption(path: Path, root: Path, probs: Problems) -> str | None:
    return read_caption(inside(path, root), probs) if path.is_file() else ""


def _clips(base: Record, info: VideoInfo, data, probs: Problems) -> list[Record]:
    """One record per clip of the video; none (after reporting) when it yields no clip."""
    try:
        clips = clip_indices(info, data.video)
    except BadVideo as e:
        probs.bad(base.key, str(e), "replace or remove it")
        return []
    if min(base.size) < probs.min_side:
        probs.bad(base.key, f"is {base.size[1]}x{base.size[0]}, smaller than the smallest bucket side "
                  f"{probs.min_side} px", "use a larger video, or lower data.resolution")
        return []
    many = len(clips) > 1
    return [replace(base, key=f"{base.key}#clip{k}" if many else base.key, clip=c) for k, c in enumerate(clips)]


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def scan_video(src, data, probs: Problems, key: str) -> list[Subset]:
    root = need_dir(src.path, key)
    pattern = "**/*" if src.recursive else "*"
    files = sorted(p for p in root.glob(pattern) if p.suffix.lower() in VIDEO_EXTS and p.is_file()
                   and not p.name.startswith("."))
    if not files:
        raise DataError(f"{root}: no videos found ({', '.join(sorted(VIDEO_EXTS))}); add videos or check the path")
    sub = _subset(src, data)
    for f in files:
        inside(f, root)
        caption = _caption(f.with_suffix(src.caption_ext), root, probs)
        if caption is None:
            continue
        try:
            info = probe_video(f, data.video.max_side)
        except (BadVideo, OSError) as e:
            probs.bad(str(f), str(e), "replace or remove the file")
            continue
        base = Record(str(f), info.size, _file_digest(f), path=str(f), caption=caption, media="video", total=info.frames)
        sub.records += _clips(base, info, data, probs)
    return [sub]


def scan_frames(src, data, probs: Problems, key: str) -> list[Subset]:
    """Clip folders of frame images; their rate is the source's `fps`."""
    from finetune.data.images import BadImage, probe

    root = need_dir(src.path, key)
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise DataError(f"{root}: no clip folders (each clip is a folder of frame images); check the path")
    sub = _subset(src, data)
    for d in folders:
        inside(d, root)
        frames = frame_files(d)
        if not frames:
            probs.bad(str(d), "holds no frame images (.png, .jpg, .webp)", "add its frames or remove the folder")
            continue
        side = d.with_suffix(src.caption_ext) if d.with_suffix(src.caption_ext).is_file() else d / "caption.txt"
        caption = _caption(side, root, probs)
        h = hashlib.blake2b(digest_size=16)
        try:
            sizes = {probe(inside(f, root).read_bytes()) for f in frames}
            for f in frames:
                h.update(f.read_bytes())
        except (BadImage, OSError) as e:
            probs.bad(str(d), f"has a frame that {e}", "replace the frame or remove the folder")
            continue
        if len(sizes) != 1 or caption is None:
            if len(sizes) != 1:
                probs.bad(str(d), f"has frames of {len(sizes)} different sizes", "give every frame one size")
            continue
        info = VideoInfo(len(frames), src.fps, sizes.pop())
        base = Record(str(d), info.size, h.hexdigest(), path=str(d), caption=caption, media="frames",
                      members=tuple(f.name for f in frames), total=len(frames))
        sub.records += _clips(base, info, data, probs)
    return [sub]


def scan_toy_video(src, data, probs: Problems, key: str) -> list[Subset]:
    from finetune.toy import video_world

    clips = (video_world.world_clips(src.count, src.seed) if src.motion == "world"
             else video_world.motion_clips(src.motion, src.count, src.seed))
    sub = _subset(src, data)
    for i, (frames, caption) in enumerate(clips):
        blob = encode_strip(frames)
        info = VideoInfo(len(frames), float(data.video.fps or 16.0), (frames[0].height, frames[0].width))
        base = Record(f"toy_video:{src.motion}#{i}", info.size, hashlib.blake2b(blob, digest_size=16).hexdigest(),
                      blob=blob, caption=src.prompt if src.prompt is not None else caption, media="strip",
                      total=len(frames))
        sub.records += _clips(base, info, data, probs)
    return [sub]


def decode_clip(rec: Record) -> list:
    """The clip's frames (PIL RGB) from wherever the record keeps them."""
    if rec.media == "video":
        from finetune.data.video import decode_video

        return decode_video(rec.path, rec.clip)
    if rec.media == "frames":
        from finetune.data.images import decode

        return [decode((Path(rec.path) / rec.members[i]).read_bytes()) for i in rec.clip]
    return decode_strip(rec.blob, rec.total, rec.clip)


VIDEO_SCANNERS = {"video": scan_video, "frames": scan_frames, "toy_video": scan_toy_video}
