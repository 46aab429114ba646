"""Evaluate a toy model through its standard diffusers pipeline (StableDiffusionPipeline or
FluxPipeline): prompt following, held-out subjects before fine-tuning, and the sample grid for the README.

    python tools/make_toy_model.py --eval-only            # the SD toy base
    python tools/make_toy_model.py --flux --eval-only     # the FLUX toy base
"""

from __future__ import annotations

import inspect
import json
import pathlib

from finetune.toy import score, world

EVAL_SEEDS = (0, 1, 2, 3)
RARE_TOKEN = "sks"


def load_pipeline(path):
    """Any toy base or fine-tuned toy model folder (SD- or FLUX-shaped) in fp32, progress bars off."""
    import torch
    from diffusers import DDIMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    pipe = DiffusionPipeline.from_pretrained(path, dtype=torch.float32)
    if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):  # flow models keep their own sampler
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sampler_settings(path) -> dict:
    """`steps` and `guidance` a toy base is meant to be sampled with (its toy_build.json), else the SD toy's."""
    info = pathlib.Path(path) / "toy_build.json"
    sampler = json.loads(info.read_text()).get("sampler", {}) if info.exists() else {}
    return {"steps": sampler.get("steps", 25), "guidance": sampler.get("guidance", 6.0)}


def _guidance_kwargs(pipe, guidance: float, n: int) -> dict:
    """Classifier-free guidance the pipeline's way. FluxPipeline: true CFG against the empty prompt (the
    FLUX toy has no guidance embedding), at the T5 length its tokenizer declares (what it was trained at)."""
    if "true_cfg_scale" in inspect.signature(pipe.__call__).parameters:
        return {
            "true_cfg_scale": guidance,
            "negative_prompt": [""] * n,
            "max_sequence_length": pipe.tokenizer_2.model_max_length,
        }
    return {"guidance_scale": guidance}


def generate(
    pipe, prompts: list[str], seeds, steps: int = 25, guidance: float = 6.0, chunk: int = 32
) -> list:
    """One image per (prompt, seed), prompt-major; seed s always gives the same image for a prompt."""
    import torch

    jobs = [(p, s) for p in prompts for s in seeds]
    images = []
    for i in range(0, len(jobs), chunk):
        part = jobs[i : i + chunk]
        gens = [torch.Generator().manual_seed(s) for _, s in part]
        out = pipe(
            [p for p, _ in part],
            generator=gens,
            num_inference_steps=steps,
            height=world.SIZE,
            width=world.SIZE,
            **_guidance_kwargs(pipe, guidance, len(part)),
        )
        images.extend(out.images)
    return images


def prompt_following(pipe, seeds=EVAL_SEEDS, **kw) -> tuple[dict, list]:
    """Colour and shape accuracy over every 'a {colour} {shape}' prompt, `seeds` samples each."""
    prompts = [f"a {c} {s}" for c in world.COLOURS for s in world.SHAPES]
    images = generate(pipe, prompts, seeds, **kw)
    flat = [p for p in prompts for _ in seeds]
    result = score.score_images(images, flat)
    per_prompt = {}
    for k, p in enumerate(flat):
        ok = per_prompt.setdefault(p, [0, 0])
        ok[0] += result["colours"][k] == score.prompt_targets(p)[0]
        ok[1] += result["shapes"][k] == score.prompt_targets(p)[1]
    summary = {k: result[k] for k in ("colour_acc", "shape_acc", "both_acc", "shape_counts")}
    summary["misses"] = {
        p: f"colour {c}/{len(seeds)}, shape {s}/{len(seeds)}"
        for p, (c, s) in per_prompt.items()
        if c < len(seeds) or s < len(seeds)
    }
    return summary, images


def held_out_before(pipe, seeds=tuple(range(8)), unrelated: list | None = None, **kw) -> dict:
    """Subject similarity of 'a sks <class>' samples from the base, next to unrelated images.

    Before fine-tuning the rare token means nothing, so these should score like unrelated images.
    """
    out = {}
    for name, subj in world.SUBJECTS.items():
        prompts = [
            f"a {RARE_TOKEN} {subj.class_word}",
            f"a {RARE_TOKEN} {subj.class_word} on a white background",
        ]
        sims = score.score_images(generate(pipe, prompts, seeds, **kw), subject=name)["subject_similarities"]
        row = {"rare_token_prompts": round(sum(sims) / len(sims), 3), "rare_token_max": round(max(sims), 3)}
        if unrelated:
            other = score.score_images(unrelated, subject=name)["subject_similarities"]
            row["unrelated_generated"] = round(sum(other) / len(other), 3)
        inst = score.score_images([i for i, _ in world.subject_images(name, 16)], subject=name)
        row["instance_images"] = round(inst["subject_similarity"], 3)
        out[name] = row
    return out


def unet_step_seconds(pipe, batch: int = 8, steps: int = 6) -> float:
    """Seconds per full-U-Net training step (forward, backward, AdamW) at `batch`, fp32 on this CPU."""
    import copy
    import time

    import torch

    unet = copy.deepcopy(pipe.unet).float().train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    x, emb = torch.randn(batch, 4, 16, 16), torch.randn(batch, 77, unet.config.cross_attention_dim)
    t = torch.randint(1000, (batch,))
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            start = time.perf_counter()
        loss = unet(x, t, emb).sample.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def save_grid(images: list, rows: list[str], cols: int, path: pathlib.Path, scale: int = 2) -> None:
    """Prompts down, seeds across, each row labelled with its prompt."""
    from PIL import Image, ImageDraw

    cell, label_w = world.SIZE * scale, 220
    grid = Image.new("RGB", (label_w + cols * cell, len(rows) * cell), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, prompt in enumerate(rows):
        draw.text((6, r * cell + cell // 2 - 6), prompt, fill=(0, 0, 0))
        for c in range(cols):
            img = images[r * cols + c].resize((cell, cell), Image.NEAREST)
            grid.paste(img, (label_w + c * cell, r * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, optimize=True)


def transformer_step_seconds(pipe, batch: int = 8, steps: int = 6) -> float:
    """Seconds per full-transformer training step (forward, backward, AdamW) at `batch`, fp32 on this CPU."""
    import copy
    import time

    import torch

    model = copy.deepcopy(pipe.transformer).float().train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cfg, seq = model.config, pipe.tokenizer_2.model_max_length
    tokens = (world.SIZE // pipe.vae_scale_factor // 2) ** 2
    kw = dict(
        hidden_states=torch.randn(batch, tokens, cfg.in_channels),
        encoder_hidden_states=torch.randn(batch, seq, cfg.joint_attention_dim),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim),
        timestep=torch.rand(batch),
        img_ids=torch.zeros(tokens, 3),
        txt_ids=torch.zeros(seq, 3),
    )
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            start = time.perf_counter()
        loss = model(**kw).sample.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def report(path, grid_path: pathlib.Path | None = None, grid_seeds: int = 6) -> dict:
    """Run every check on the model at `path` with the sampler it is meant for, print the numbers as
    JSON, and write the grid."""
    pipe = load_pipeline(path)
    kw = sampler_settings(path)
    following, images = prompt_following(pipe, **kw)
    result = {
        "sampler": kw,
        "prompt_following": following,
        "held_out_before_finetuning": held_out_before(pipe, unrelated=images, **kw),
    }
    if getattr(pipe, "unet", None) is not None:
        result["unet_step_s_batch8"] = round(unet_step_seconds(pipe), 3)
    else:
        result["transformer_step_s_batch8"] = round(transformer_step_seconds(pipe), 3)
    if grid_path is not None:
        # One row per prompt in the grid would be 20 rows; every colour once and every shape 5 times
        # across the rows keeps it to a README-sized picture.
        rows = [f"a {c} {s}" for i, c in enumerate(world.COLOURS) for s in world.SHAPES[i % 2 :: 2]]
        rows += [
            f"a {c} {s} on a {bg} background"
            for c, s, bg in [
                ("red", "star", "black"),
                ("blue", "circle", "lined"),
                ("yellow", "triangle", "gray"),
            ]
        ]
        save_grid(generate(pipe, rows, range(grid_seeds), **kw), rows, grid_seeds, grid_path)
        result["grid"] = str(grid_path)
    print(json.dumps(result, indent=2))
    return result
