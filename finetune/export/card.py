"""The model card: README.md beside the weights, telling what the files are and how to use them."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from finetune.export.io import write_text_atomic

LOAD_SNIPPETS = {
    "lora": (
        "pipe = {pipeline}.from_pretrained(\"{base}\")\n"
        "pipe.load_lora_weights(\"{folder}\")\n"
    ),
    "embedding": (
        "pipe = {pipeline}.from_pretrained(\"{base}\")\n"
        "pipe.load_textual_inversion(\"{folder}\")\n"
    ),
    "full": "pipe = {pipeline}.from_pretrained(\"{folder}/model\")\n",
    "pivotal": (
        "pipe = {pipeline}.from_pretrained(\"{base}\")\n"
        "pipe.load_textual_inversion(\"{folder}\")\n"
        "pipe.load_lora_weights(\"{folder}\")\n"
    ),
}
UI_NOTES = {
    "lora": "The `.safetensors` named after the run loads in ComfyUI (LoRA loader) and AUTOMATIC1111 (`models/Lora`).",
    "embedding": "The `.safetensors` named after the run goes in ComfyUI's and AUTOMATIC1111's `embeddings/` "
    "folder; write its file name in the prompt.",
    "pivotal": "For ComfyUI and AUTOMATIC1111 use both `.safetensors`: the one named after the run is the LoRA "
    "(`models/Lora`), the `_emb` one the embedding (`embeddings/`, write its file name where the token goes).",
    "full": "The single `.safetensors` checkpoint loads in ComfyUI (`models/checkpoints`) and AUTOMATIC1111 "
    "(`models/Stable-diffusion`); diffusers opens it with `from_single_file(path, config=\"{folder}/model\")`.",
}


def write_model_card(out_dir: Path, ctx, files: list[Path], kind: str) -> Path:
    triggers = ", ".join(f"`{w}`" for w in ctx.trigger_words) or "(none)"
    prompt = ctx.trigger_words[0] if ctx.trigger_words else "a photo"
    listing = "\n".join(f"- `{Path(f).name}`" for f in files)
    grid = ""
    if ctx.sample_grid and Path(ctx.sample_grid).is_file():
        grid = f"![samples]({os.path.relpath(ctx.sample_grid, out_dir)})\n"
    from finetune.models.family import FAMILIES

    family = FAMILIES.get(ctx.family)
    pipeline = family.pipeline_class if family else "StableDiffusionPipeline"
    snippet = LOAD_SNIPPETS.get(kind, "").format(base=ctx.base, folder=out_dir.name, pipeline=pipeline)
    if family and len(family.text_encoder_names) > 1 and kind in ("embedding", "pivotal"):
        # one load per text encoder: finetune's helper does both (diffusers needs text_encoder_2= etc.)
        snippet = snippet.replace(f'pipe.load_textual_inversion("{out_dir.name}")\n',
                                  "from finetune.export.embeddings import load_into_pipeline\n"
                                  f'load_into_pipeline(pipe, "{out_dir.name}")\n')
    recipe = yaml.safe_dump(ctx.recipe, sort_keys=False)
    metrics = f"## Metrics\n{ctx.metrics}\n" if getattr(ctx, "metrics", None) else ""
    ui = UI_NOTES.get(kind, "").format(folder=out_dir.name)
    text = f"""---
base_model: {ctx.base}
tags: [text-to-image, diffusers, {ctx.method}, finetune]
---
# {ctx.name}

A {ctx.method} ({kind}) for `{ctx.base}` ({ctx.family}), trained with finetune for {ctx.steps} steps
at {ctx.resolution} px.

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

{snippet}image = pipe("{prompt}").images[0]
```

## Recipe
```yaml
{recipe}```
"""
    return write_text_atomic(out_dir / "README.md", text)
