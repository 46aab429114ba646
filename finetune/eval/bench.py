"""What the metrics cost a run: seconds to score one validation grid with evaluation models of DreamBench's
sizes, on this machine (`python tools/bench.py --metrics`).

The models are built from their architectures with random weights (CLIP ViT-B/32 as openai/clip-vit-base-patch32,
ViT-S/16 as facebook/dino-vits16), since nothing downloads here; time and memory depend on the architecture,
not on the weights. The tokenizer is the toy CLIP's (short prompts cost the same). Measured per grid:
the first one (models load, reference images are embedded once) and the later ones (the models move to the
device and back, the grid's images are embedded).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch


def dreambench_sized(folder: Path) -> tuple[str, str]:
    """Random-weight CLIP ViT-B/32 and DINO ViT-S/16 folders, with their preprocessors."""
    from transformers import (
        AutoTokenizer,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    from finetune.eval.embedders import TOY_DIR

    clip, dino = folder / "clip-vit-b32", folder / "dino-vits16"
    if not (clip / "config.json").is_file():
        torch.manual_seed(0)
        CLIPModel(CLIPConfig()).save_pretrained(clip)  # transformers' defaults are ViT-B/32 with a 512-d text tower
        CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224}).save_pretrained(clip)
        AutoTokenizer.from_pretrained(TOY_DIR / "clip").save_pretrained(clip)
    if not (dino / "config.json").is_file():
        ViTModel(ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                           patch_size=16, image_size=224), add_pooling_layer=False).save_pretrained(dino)
        ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(dino)
    return str(clip), str(dino)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(folder: Path, device: str, dtype: torch.dtype, prompts: int = 25, seeds: int = 4,
            references: int = 5, size: int = 512, grids: int = 3) -> dict:
    """Score `grids` grids of prompts x seeds images of `size` px against `references` images."""
    import numpy as np
    from PIL import Image

    from finetune.eval.embedders import EvalModels
    from finetune.eval.scoring import Scorer

    dev = torch.device(device)
    rng = np.random.default_rng(0)

    def image():
        return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))

    clip, dino = dreambench_sized(folder)
    refs = [image() for _ in range(references)]
    names = [f"a sks dog {k}" if k % 2 == 0 else f"a dog {k}" for k in range(prompts)]
    rows = [[image() for _ in range(seeds)] for _ in names]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    scorer = Scorer(["clip_i", "clip_t", "dino"], EvalModels(clip, dino, dtype), refs, "sks", "dog", dev)
    times = []
    for _ in range(grids):
        start = time.perf_counter()
        scorer.score(rows, names)
        _sync(dev)
        times.append(time.perf_counter() - start)
    out = {"device": str(dev), "dtype": str(dtype).removeprefix("torch."), "images": prompts * seeds,
           "references": references, "size": size, "first_grid_s": times[0],
           "grid_s": float(np.median(times[1:])) if len(times) > 1 else times[0],
           "total_s": time.perf_counter() - t0}
    out["images_per_s"] = out["images"] / out["grid_s"]
    if dev.type == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
        out["gpu_after_mib"] = torch.cuda.memory_allocated(dev) / 2**20  # models back on the CPU
    return out


def table(rows: list[dict]) -> str:
    head = ["device", "dtype", "images/grid", "first grid s", "grid s", "images/s", "peak GPU MiB", "GPU after MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["device"], r["dtype"], str(r["images"]), f"{r['first_grid_s']:.2f}", f"{r['grid_s']:.2f}",
            f"{r['images_per_s']:.1f}", f"{r['peak_gpu_mib']:.0f}" if "peak_gpu_mib" in r else "-",
            f"{r['gpu_after_mib']:.0f}" if "gpu_after_mib" in r else "-"]) + " |")
    return "\n".join(lines)
