"""Video samples: writing them (animated GIF, MP4 through PyAV, frame-strip PNG grids) and scoring them.

Metrics (docs/metrics.md):
- CLIP-T per frame: the cosine similarity of the prompt's CLIP text embedding with each frame's CLIP image
  embedding; a clip's CLIP-T is the mean over its frames (an image's CLIP-T, frame by frame).
- temporal consistency: the mean cosine similarity of consecutive frames' CLIP image embeddings, in [-1, 1]
  (1: every frame looks the same to CLIP). A clip that flickers or changes subject between frames scores
  lower; a still clip scores highest, so read it beside the motion the prompt asks for, not alone.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

Clip = list  # a clip: a list of PIL frames


def strip(clip: Clip) -> Image.Image:
    """A clip's frames side by side."""
    w, h = clip[0].size
    out = Image.new("RGB", (w * len(clip), h), "white")
    for i, frame in enumerate(clip):
        out.paste(frame.convert("RGB"), (i * w, 0))
    return out


def strip_grid(rows: dict[str, list[Clip]], title: str = "") -> Image.Image:
    """A labelled grid of frame strips: one row per clip, grouped under each prompt."""
    strips = [(label if j == 0 else "", strip(c)) for label, clips in rows.items() for j, c in enumerate(clips)]
    w = max(s.width for _, s in strips)
    label_h, top = 14, 14 if title else 0
    canvas = Image.new("RGB", (max(w, 8 * len(title)), top + sum(s.height + label_h for _, s in strips)), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((2, 1), title, fill="black")
    y = top
    for label, s in strips:
        draw.text((2, y + 1), label[: w // 6], fill="black")
        canvas.paste(s, (0, y + label_h))
        y += s.height + label_h
    return canvas


def tiled(clips: list[Clip]) -> Clip:
    """Several clips of the same length as one clip, their frames side by side."""
    return [strip([c[i] for c in clips]) for i in range(len(clips[0]))]


def grid_clip(rows: list[list[Clip]]) -> Clip:
    """Rows of clips as one clip: each row's clips side by side, rows stacked top to bottom."""
    lines = [tiled(row) for row in rows]
    w, h = max(line[0].width for line in lines), sum(line[0].height for line in lines)
    out = []
    for i in range(len(lines[0])):
        frame, y = Image.new("RGB", (w, h), "white"), 0
        for line in lines:
            frame.paste(line[i], (0, y))
            y += line[i].height
        out.append(frame)
    return out


def save_gif(clips: list[Clip] | list[list[Clip]], path: Path, fps: int = 8) -> Path:
    """An animated GIF, looping (written atomically): clips side by side, or rows of clips as a grid."""
    from finetune.export.io import atomic_path

    frames = grid_clip(clips) if isinstance(clips[0][0], list) else tiled(clips)
    with atomic_path(Path(path)) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    return Path(path)


def save_mp4(clip: Clip, path: Path, fps: int = 8) -> Path:
    """An H.264 MP4 of one clip through PyAV (sides padded to even numbers, as yuv420p needs)."""
    import av
    import numpy as np

    from finetune.export.io import atomic_path

    w, h = clip[0].size
    ew, eh = w + w % 2, h + h % 2
    with atomic_path(Path(path)) as tmp, av.open(str(tmp), mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = ew, eh, "yuv420p"
        for frame in clip:
            canvas = Image.new("RGB", (ew, eh))
            canvas.paste(frame.convert("RGB"))
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(canvas), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return Path(path)


def clip_t_per_frame(clip_model, clip: Clip, prompt: str) -> list[float]:
    """CLIP-T of every frame (cosine of the prompt's text embedding with the frame's image embedding)."""
    from torch.nn.functional import normalize

    image, text = normalize(clip_model.images(clip), dim=-1), normalize(clip_model.texts([prompt]), dim=-1)
    return (image @ text.T).flatten().tolist()


def temporal_consistency(clip_model, clip: Clip) -> float:
    """Mean cosine similarity of consecutive frames' CLIP image embeddings (1.0 for a one-frame clip)."""
    if len(clip) < 2:
        return 1.0
    from torch.nn.functional import normalize

    e = normalize(clip_model.images(clip), dim=-1)
    return float((e[1:] * e[:-1]).sum(dim=-1).mean())
