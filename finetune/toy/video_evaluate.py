"""How well a toy video base (or one with a LoRA) follows prompts: colour, shape and motion of sampled clips,
over `PROMPTS` (20 prompts) x seeds, scored by finetune/toy/video_score.py; plus the frame-strip grid and a GIF.

    python tools/make_toy_model.py --video --eval-only
"""

from __future__ import annotations

import json
import pathlib

from finetune.toy import build_video, video_world
from finetune.toy.build import log
from finetune.toy.video_score import score_clip

EVAL_MOTIONS = [*(f"moving {d}" for d in video_world.DIRECTIONS), "growing"]


def eval_prompts() -> list[str]:
    """20 prompts 'a {colour} {shape} {motion}': every (motion, shape) pair once (5 x 4), each colour 4 times and
    with 4 shapes and 4 motions."""
    colours, shapes = list(video_world.COLOURS), video_world.SHAPES
    return [f"a {colours[(3 * i + i // 4) % 5]} {shapes[i % 4]} {EVAL_MOTIONS[i % 5]}" for i in range(20)]


PROMPTS = eval_prompts()


def load_pipeline(path: pathlib.Path):
    import torch
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(path, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, prompt: str, seeds, steps: int | None = None, guidance: float | None = None):
    """One clip (a list of PIL frames) per seed, as WanPipeline samples the toy base."""
    import torch
    from PIL import Image

    s = build_video.SAMPLER
    gens = [torch.Generator().manual_seed(x) for x in seeds]
    out = pipe([prompt] * len(seeds), negative_prompt=[""] * len(seeds), height=s["size"], width=s["size"],
               num_frames=s["frames"], num_inference_steps=steps or s["steps"],
               guidance_scale=s["guidance"] if guidance is None else guidance, generator=gens,
               max_sequence_length=build_video.MAX_SEQUENCE_LENGTH, output_type="np")
    return [[Image.fromarray((f * 255).round().clip(0, 255).astype("uint8")) for f in clip] for clip in out.frames]


def prompt_following(pipe, prompts=PROMPTS, seeds=(0, 1, 2, 3), **kw) -> tuple[dict, dict]:
    """(summary accuracies, {prompt: [clips]}) over prompts x seeds."""
    clips, rows = {}, []
    for p in prompts:
        clips[p] = sample(pipe, p, seeds, **kw)
        rows += [score_clip(c, p) for c in clips[p]]
    summary = {f"{k}_acc": sum(r[f"{k}_ok"] for r in rows) / len(rows) for k in ("colour", "shape", "motion", "all")}
    summary["smoothness"] = sum(r["smoothness"] for r in rows) / len(rows)
    summary["samples"] = len(rows)
    return summary, clips


def report(path: pathlib.Path, grid_path: pathlib.Path | None = None, seeds=(0, 1, 2, 3)) -> dict:
    """Evaluate the base in `path`, write its numbers to toy_eval.json beside it, the grid and a GIF."""
    from finetune.eval.video import save_gif, strip_grid

    pipe = load_pipeline(path)
    summary, clips = prompt_following(pipe, seeds=seeds)
    log(f"toy video base {path}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items() if k != "samples")
        + f" over {summary['samples']} clips")
    (path / "toy_eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    if grid_path is not None:
        shown = PROMPTS[:6]
        strip_grid({p: clips[p][:2] for p in shown}).save(grid_path)
        save_gif([clips[p][0] for p in shown], grid_path.with_suffix(".gif"))
    return summary
