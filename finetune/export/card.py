"""The model card: README.md beside the weights, telling what the files are and how to use them."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from finetune.export.context import LOCAL
from finetune.export.io import write_text_atomic

LOAD_SNIPPETS = {
    "lora": (
        "pipe = {pipeline}.from_pretrained({base}, torch_dtype={dtype}).to(device)\n"
        "pipe.load_lora_weights(\"{folder}\")\n"
    ),
    "embedding": (
        "pipe = {pipeline}.from_pretrained({base}, torch_dtype={dtype}).to(device)\n"
        "pipe.load_textual_inversion(\"{folder}\")\n"
    ),
    "full": "pipe = {pipeline}.from_pretrained(\"{folder}/model\", torch_dtype={dtype}).to(device)\n",
    "pivotal": (
        "pipe = {pipeline}.from_pretrained({base}, torch_dtype={dtype}).to(device)\n"
        "pipe.load_textual_inversion(\"{folder}\")\n"
        "pipe.load_lora_weights(\"{folder}\")\n"
    ),
}
# the dtype the snippet loads in: the run's compute precision (fp32 runs anywhere, the toy base on a CPU too)
SNIPPET_DTYPES = {"no": "torch.float32", "fp16": "torch.float16", "bf16": "torch.bfloat16"}
UI_NOTES = {
    "lora": "The `.safetensors` named after the run loads in ComfyUI (LoRA loader) and AUTOMATIC1111 (`models/Lora`).",
    "embedding": "The `.safetensors` named after the run goes in ComfyUI's and AUTOMATIC1111's `embeddings/` "
    "folder; write its file name in the prompt.",
    "pivotal": "For ComfyUI and AUTOMATIC1111 use both `.safetensors`: the one named after the run is the LoRA "
    "(`models/Lora`), the `_emb` one the embedding (`embeddings/`, write its file name where the token goes).",
    "full": "The single `.safetensors` checkpoint loads in ComfyUI (`models/checkpoints`) and AUTOMATIC1111 "
    "(`models/Stable-diffusion`); diffusers opens it with `from_single_file(path, config=\"{folder}/model\")`.",
}
DORA_NOTE = (
    "**DoRA:** the diffusers file applies this DoRA exactly. There is no kohya file: AUTOMATIC1111 normalises a "
    "DoRA magnitude over input columns and ComfyUI divides by the base weight's norm instead of the adapted one, "
    "so neither would apply it exactly (off by a sizeable part of the adapter's change). For ComfyUI and "
    "AUTOMATIC1111, bake it into a checkpoint, which loads exactly: "
    "`python tools/merge.py fuse --base <base> --lora {folder} --single-file merged.safetensors`."
)


def write_model_card(out_dir: Path, ctx, files: list[Path], kind: str, dora: bool = False) -> Path:
    triggers = ", ".join(f"`{w}`" for w in ctx.trigger_words) or "(none)"
    prompt = ctx.trigger_words[0] if ctx.trigger_words else "a photo"
    listing = "\n".join(f"- `{Path(f).name}`" for f in files)
    grid = ""
    if ctx.sample_grid and Path(ctx.sample_grid).is_file():
        grid = f"![samples]({os.path.relpath(ctx.sample_grid, out_dir)})\n"
        clips = Path(ctx.sample_grid).with_suffix(".gif")  # video families: the samples playing
        if clips.is_file():
            grid += f"\n![sample clips]({os.path.relpath(clips, out_dir)})\n"
    from finetune.models.families import FAMILIES

    family = FAMILIES.get(ctx.family)
    pipeline = family.pipeline_class if family else "StableDiffusionPipeline"
    edit = family is not None and family.edit_pipeline_class and (ctx.recipe.get("data") or {}).get("conditioning")
    if edit:  # an edit or reference model: its edit pipeline, with an input image
        pipeline = family.edit_pipeline_class
    target = getattr(ctx, "target", "") or ctx.base  # the base the export is for (route 1: the distilled one)
    real = (getattr(ctx, "model", None) or {}).get("base") if target == ctx.base else None
    base, imports = _base_expression(target, real, out_dir)
    dtype = SNIPPET_DTYPES.get(ctx.recipe.get("train", {}).get("mixed_precision", "no"), "torch.float32")
    snippet = LOAD_SNIPPETS.get(kind, "").format(base=base, folder=out_dir.name, pipeline=pipeline, dtype=dtype)
    if family and len(family.text_encoder_names) > 1 and kind in ("embedding", "pivotal"):
        # one load per text encoder: finetune's helper does both (diffusers needs text_encoder_2= etc.)
        snippet = snippet.replace(f'pipe.load_textual_inversion("{out_dir.name}")\n',
                                  "from finetune.export.embeddings import load_into_pipeline\n"
                                  f'load_into_pipeline(pipe, "{out_dir.name}")\n')
    recipe = yaml.safe_dump(ctx.recipe, sort_keys=False)
    metrics = f"## Metrics\n{ctx.metrics}\n" if ctx.metrics else ""
    ui = DORA_NOTE.format(folder=out_dir.name) if dora else UI_NOTES.get(kind, "").format(folder=out_dir.name)
    if kind == "lora" and family is not None and not dora:
        ui = _lora_ui_note(family, ctx, files)
    prompts = getattr(ctx, "instance_prompts", [])
    if prompts:
        triggers += "\n\n**Instance prompt(s):** " + ", ".join(f"`{p}`" for p in prompts)
    # a local base is named '<local>/<folder>' (no paths of the trainer's machine); the hub's base_model key
    # wants a hub id, so it is left out then
    front = "" if target.startswith(LOCAL) else f"base_model: {target}\n"
    text = f"""---
{front}tags: [text-to-image, diffusers, {ctx.method}, finetune]
---
# {ctx.name}

A {ctx.method} ({kind}) for `{target}` ({ctx.family}), trained with finetune for {ctx.steps} steps
at {ctx.resolution} px{_route_note(ctx)}.

**Trigger words:** {triggers}

{grid}
{metrics}
## Files
{listing}

{ui}

## Use with diffusers
```python
import torch
from diffusers import {pipeline}
{imports}
device = "cuda" if torch.cuda.is_available() else "cpu"
{snippet}{_edit_call(family, ctx, prompt, base) if edit else _sample_line(family, ctx, prompt, files)}
```

{_sampling_note(family, ctx)}

## Recipe
```yaml
{recipe}```
"""
    return write_text_atomic(out_dir / "README.md", text)


def _base_expression(base: str, real: str | None = None, out_dir: Path | None = None) -> tuple[str, str]:
    """The Python expression that names the base in the snippet, and the import it needs. The toy bases live
    inside the installed package; a local folder is named relative to the folder holding the run, where the
    snippet runs (the card keeps no absolute paths of the trainer's machine)."""
    from finetune.toy import TOY_BASES

    if base in ("toy", "toy-flux"):
        name = "toy_base_path" if base == "toy" else "toy_flux_base_path"
        return f"{name}()", f"from finetune.toy import {name}\n"
    if base in TOY_BASES:
        return f'toy_path("{base}")', "from finetune.toy import toy_path\n"
    if real and out_dir is not None and Path(real).expanduser().exists():
        return repr(os.path.relpath(Path(real).expanduser().resolve(), out_dir.resolve().parent)), ""
    return repr(base), ""


def _route_note(ctx) -> str:
    """Where it trained when that is not the base it is for, and the training adapter it trained through."""
    parts = []
    if getattr(ctx, "target", ""):
        parts.append(f", on `{ctx.base}`")
    if getattr(ctx, "training_adapter", ""):
        parts.append(f", through the training adapter `{ctx.training_adapter}` (applied while training only: it "
                     "is not part of these files, and using them does not need it)")
    return "".join(parts)

def _sample_line(family, ctx, prompt: str, files) -> str:
    """The snippet's last lines: an image, or (video families) a clip written as MP4, with a Wan 2.2 run's
    low-noise LoRA loaded into the second expert first."""
    if family is None or not family.video:
        return f'image = pipe("{prompt}"{_call_args(family, ctx)}).images[0]'
    low = [Path(f).name for f in files if Path(f).name.startswith("pytorch_lora_weights_low_noise")]
    lines = [f'pipe.load_lora_weights("{Path(files[0]).parent.name}", weight_name="{low[0]}", '
             "load_into_transformer_2=True)"] if low else []
    frames = (_validation(ctx).get("frames") or (ctx.recipe.get("data", {}).get("video") or {}).get("frames", 81))
    start = ", image=first_frame" if family.start_image else ""
    lines += ["from diffusers.utils import export_to_video",
              f'video = pipe("{prompt}"{start}, num_frames={frames}{_call_args(family, ctx)}).frames[0]',
              'export_to_video(video, "sample.mp4", fps=16)']
    return "\n".join(lines)


def _validation(ctx) -> dict:
    return ctx.recipe.get("validation", {}) if isinstance(ctx.recipe, dict) else {}


def _steps(ctx) -> int:
    """The steps the grids used: the run's sampling settings, else the recipe's (30 by default)."""
    return (getattr(ctx, "sampling", None) or {}).get("steps") or _validation(ctx).get("steps") or 30


def _guidance(family, ctx) -> float:
    g = (getattr(ctx, "sampling", None) or {}).get("guidance")
    g = _validation(ctx).get("guidance_scale") if g is None else g
    return float(g) if g is not None else (family.default_guidance if family else 7.5)


def _edit_call(family, ctx, prompt: str, base: str) -> str:
    """An edit model's call: an input image (a toy drawing for the toy bases, so the snippet runs offline), the
    prompt the grids used first, and the family's own way to hand the pipeline the image at the trained size.
    The 64 px toy needs FluxKontextPipeline's auto-resize off, max_area 64*64, its 32 T5 tokens and true CFG (it
    has no guidance input)."""
    from types import SimpleNamespace

    v, model = _validation(ctx), ctx.recipe.get("model") or {}
    size = (v.get("width") or ctx.resolution, v.get("height") or ctx.resolution)
    prompt = (v.get("prompts") or [prompt])[0]
    toy = base.startswith("toy_")
    load = ('from finetune.toy import world\nimage = world.draw("star", "purple")  # an input the toy can edit\n'
            if toy else 'from diffusers.utils import load_image\nimage = load_image("input.png")  # your input\n')
    words = {k: (v if k != "image" else "IMAGE") for k, v in family.edit_kwargs(["IMAGE"], size).items()}
    config = _transformer_config(ctx.base, model.get("base"))
    words |= family.guidance_kwargs(SimpleNamespace(transformer=SimpleNamespace(config=config)), _guidance(family, ctx))
    if "true_cfg_scale" in words:
        words["negative_prompt"] = v.get("negative_prompt", "")
    if model.get("max_sequence_length"):
        words["max_sequence_length"] = model["max_sequence_length"]
    words |= {"height": size[1], "width": size[0], "num_inference_steps": v.get("steps", 30)}
    args = ", ".join(f"{k}={'image' if w == 'IMAGE' else '[image]' if w == ['IMAGE'] else repr(w)}"
                     for k, w in words.items())
    return f'{load}image = pipe(prompt="{prompt}", {args}).images[0]'


def _transformer_config(base: str, real: str | None) -> dict:
    """The base transformer's config where it is on this machine (a guidance input or not); else FLUX [dev]'s."""
    import json

    from finetune.toy import toy_path

    folder = toy_path(base) or (Path(real).expanduser() if real else None)
    path = folder / "transformer" / "config.json" if folder else None
    return json.loads(path.read_text()) if path and path.is_file() else {"guidance_embeds": True}


def _call_args(family, ctx) -> str:
    """The sampler settings the validation grids used, so the snippet renders what the grids showed."""
    v = _validation(ctx)
    return f", num_inference_steps={_steps(ctx)}, guidance_scale={_guidance(family, ctx):g}" if v else ""


def _sampling_note(family, ctx) -> str:
    v = _validation(ctx)
    if not v or family is None:
        return ""
    choice = v.get("scheduler", "auto")
    choice = family.default_sampler if choice == "auto" else choice
    sampler = ("the base's own scheduler" if choice == "base" else f"`{choice}`")
    if family.objective == "flow":
        sampler += " (flow matching, with the shift the pipeline applies)"
    what = (getattr(ctx, "sampling", None) or {})
    made = f" The base it is for is {what['what']}, " + (
        " and ".join(f"{d}-distilled" for d in what["distilled"]) + "." if what.get("distilled") else
        "not distilled.") if what.get("what") else ""
    return (f"**Sampling:** the grids above used {sampler}, {_steps(ctx)} steps, guidance "
            f"{_guidance(family, ctx):g}; use the same in ComfyUI to see the same images.{made}")


def _lora_ui_note(family, ctx, files) -> str:
    """Which of the written files each UI loads, for this family."""
    names = {Path(f).name for f in files}
    kohya, bfl = f"{ctx.name}.safetensors", f"{ctx.name}_bfl.safetensors"
    lines = []
    if kohya in names:
        where = "ComfyUI (LoRA loader)" if family.objective == "flow" else \
            "ComfyUI (LoRA loader) and AUTOMATIC1111 / Forge (`models/Lora`)"
        lines.append(f"`{kohya}` loads in {where}.")
    low = f"{ctx.name}_low_noise.safetensors"
    if low in names:  # Wan 2.2: one file per expert
        lines.append(f"`{low}` is the low-noise expert's LoRA: load it on the low-noise model (ComfyUI), or with "
                     "`load_lora_weights(..., load_into_transformer_2=True)` in diffusers.")
    if bfl in names:
        lines.append(f"`{bfl}` holds the same LoRA in Black Forest Labs' names (q/k/v fused: the fused layers' "
                     "rank is 3x, or 4x for single blocks, with alpha scaled to match) for sd-scripts and Forge.")
    return " ".join(lines)
