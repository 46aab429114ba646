"""Training benchmarks: steps/s, images/s, peak memory and where each step's time goes.

Each configuration runs in its own process (so peak memory is its own), trains `warmup + steps` steps
through the real trainer with its phase timer on, and reports the measured steps only. `tools/bench.py` is
the command line over this module.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("data", "vae_encode", "text_encode", "denoiser_forward", "base_forward", "backward", "optimizer",
          "logging_validation")
_WORLD = {"type": "toy", "subject": "world", "count": 16}

# name -> recipe overrides (on top of the base recipe of the chosen model)
VARIANTS: dict[str, dict[str, Any]] = {
    "no-cache": {"data": {"cache_latents": False, "cache_text": False}},
    "latent-cache": {"data": {"cache_latents": True, "cache_text": False}},
    "latent+text-cache": {"data": {"cache_latents": True, "cache_text": True}},
    "grad-checkpointing": {"data": {"cache_latents": True, "cache_text": True},
                           "train": {"gradient_checkpointing": True}},
    "adamw8bit": {"data": {"cache_latents": True, "cache_text": True}, "train": {"optimizer": "adamw8bit"}},
    "channels-last": {"data": {"cache_latents": True, "cache_text": True}, "train": {"channels_last": True}},
    "compile": {"data": {"cache_latents": True, "cache_text": True}, "train": {"compile": True}},
    # base-prediction preservation: half of every batch also runs the base (adapters off, no gradients)
    "preservation": {"data": {"cache_latents": True, "cache_text": True,
                              "sources": [_WORLD, {**_WORLD, "seed": 1, "preserve": True}],
                              "preservation": {"share": 0.5}}},
}


def base_recipe(model: str, batch: int, steps: int, precision: str, rank: int, adapter: str) -> dict[str, Any]:
    toy = model == "toy"
    res = {"toy": 64, "sd15": 512, "sdxl": 1024, "sd35m": 1024}[model]
    source = ({"type": "toy", "subject": "world", "count": 64} if toy else
              {"type": "toy", "subject": "world", "count": 16})
    return {
        "model": {"base": "toy" if toy else str(random_base(model))},
        "data": {"sources": [source], "resolution": res, "buckets": {"enabled": False}},
        "method": {"name": "lora", "rank": rank, "adapter": adapter,
                   "targets": {"toy": "locon", "sd35m": "attention"}.get(model, "attention_ff")},
        "train": {"max_steps": steps, "batch_size": batch, "lr": 1e-4, "checkpoint_every": 0,
                  "mixed_precision": precision, "seed": 0},
        "validation": {"prompts": [], "at_start": False},
        "export": {"formats": ["diffusers"], "model_card": False},
        "logging": {"report_to": [], "progress": False},
    }


def random_base(model: str) -> Path:
    """SD 1.5 / SDXL built from their public configs with random weights (timing needs no trained weights)."""
    from finetune.models.reference import build_reference_base

    return build_reference_base(model, ROOT / "output" / "bench" / f"{model}-random")


# ------------------------------------------------------------------------------------ one measurement
def measure(recipe_data: dict[str, Any], warmup: int, steps: int) -> dict[str, Any]:
    """Run in a child process: train warmup+steps, return timings of the last `steps`."""
    import torch

    from finetune.recipe import validate
    from finetune.train.setup import make_accelerator, quiet_libraries
    from finetune.train.trainer import Trainer

    quiet_libraries()
    recipe = validate(recipe_data)
    acc = make_accelerator(recipe)
    t = Trainer(recipe, acc)
    t.timer.enabled = True
    stamps: list[float] = []
    first_step: list[float] = []
    original = t.train_step

    def timed(batch):
        stepped, logs = original(batch)
        if stepped:
            stamps.append(time.perf_counter())
            if not first_step:
                first_step.append(time.time() - _process_start())
            if len(stamps) == warmup:
                t.timer.reset()
        return stepped, logs

    t.train_step = timed
    t.run()
    wall = stamps[-1] - stamps[warmup - 1]
    out = {
        "steps": steps, "batch": recipe.train.batch_size, "step_s": wall / steps,
        "steps_per_s": steps / wall, "images_per_s": steps * recipe.train.batch_size / wall,
        "time_to_first_step_s": first_step[0],
        "peak_host_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "phases_s": {p: t.timer.totals.get(p, 0.0) / steps for p in PHASES},
    }
    if torch.cuda.is_available():
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def bare_denoiser(recipe_data: dict[str, Any], warmup: int, steps: int) -> dict[str, Any]:
    """The floor: denoiser forward + backward + optimizer on ready tensors, no loop, no data."""
    import torch

    from finetune.models.components import cast_frozen, load_components
    from finetune.recipe import validate
    from finetune.train.optim import build_optimizer

    recipe = validate(recipe_data)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[recipe.train.mixed_precision]
    comps = load_components(recipe.model)
    method = recipe.method.build()
    groups = method.setup(comps, recipe.train.lr)
    cast_frozen(comps, dtype, dtype)
    denoiser = comps.denoiser.to(device)
    opt = build_optimizer(groups, recipe.train)
    # latent side = image side / the VAE's downsampling (8 for SD, 4 for the toy VAE)
    factor = 2 ** (len(comps.vae.config.block_out_channels) - 1)
    b, res = recipe.train.batch_size, recipe.data.resolution // factor
    latents = torch.randn(b, comps.vae.config.latent_channels, res, res, device=device)
    with torch.no_grad():  # real conditioning shapes from the family's own encoding (on the CPU)
        text = {k: v.to(device, dtype) for k, v in comps.family.encode_prompt(comps, [""] * b, "cpu").items()}
    size = torch.tensor([[recipe.data.resolution] * 2] * b, device=device)
    batch = {"original_size": size, "target_size": size, "crop_top_left": torch.zeros_like(size)}
    t = torch.randint(1, 1000, (b,), device=device)
    t = t.float() if comps.family.objective == "flow" else t
    times = []
    for i in range(warmup + steps):
        _sync()
        start = time.perf_counter()
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            pred = comps.family.predict(denoiser, latents, t, text, batch)
        torch.nn.functional.mse_loss(pred.float(), latents).backward()
        if recipe.train.max_grad_norm:  # the trainer clips too: same work on both sides
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], recipe.train.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"step_s": sum(times) / len(times), "steps": steps, "batch": b}


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _process_start() -> float:
    import psutil

    return psutil.Process().create_time()


# ------------------------------------------------------------------------------------------ harness
def run_child(kind: str, recipe_data: dict[str, Any], warmup: int, steps: int, timeout: int = 3600) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        recipe_data = json.loads(json.dumps(recipe_data))
        recipe_data["train"]["output_dir"] = str(Path(tmp) / "run")
        recipe_data["data"]["cache_dir"] = str(Path(tmp) / "cache")
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"kind": kind, "recipe": recipe_data, "warmup": warmup, "steps": steps}))
        result = Path(tmp) / "result.json"
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
        cmd = [sys.executable, "-m", "finetune.bench", "--child", str(spec), str(result)]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
        return json.loads(result.read_text())


def time_bad_recipe() -> float:
    with tempfile.TemporaryDirectory() as tmp:
        bad = Path(tmp) / "bad.yaml"
        bad.write_text(yaml.safe_dump({"data": {"sources": [{"type": "folder", "path": tmp}]},
                                       "method": {"name": "lora"}, "train": {"lrr": 1}}))
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "finetune", str(bad)], cwd=ROOT, capture_output=True)
        return time.perf_counter() - start


def _child_main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    fn = measure if spec["kind"] == "train" else bare_denoiser
    result = fn(spec["recipe"], spec["warmup"], spec["steps"])
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--child":
    _child_main(sys.argv[2], sys.argv[3])
