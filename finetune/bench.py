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
    # issue 41: regional compile, the optimizer stepped inside the backward, token routing (flow transformers)
    "compile-blocks": {"data": {"cache_latents": True, "cache_text": True}, "train": {"compile": "blocks"}},
    "in-backward": {"data": {"cache_latents": True, "cache_text": True},
                    "train": {"optimizer_in_backward": True, "max_grad_norm": None, "on_nan": "stop"}},
    "routing": {"data": {"cache_latents": True, "cache_text": True},
                "train": {"routing": {"drop_ratio": 0.5, "first_block": 1, "last_block": -2}}},
    "everything": {"data": {"cache_latents": True, "cache_text": True},
                   "train": {"compile": "blocks", "optimizer_in_backward": True, "max_grad_norm": None,
                             "on_nan": "stop"}},
    "everything+routing": {"data": {"cache_latents": True, "cache_text": True},  # flow transformers
                           "train": {"compile": "blocks", "optimizer_in_backward": True, "max_grad_norm": None,
                                     "on_nan": "stop",
                                     "routing": {"drop_ratio": 0.5, "first_block": 1, "last_block": -2}}},
    # base-prediction preservation: half of every batch also runs the base (adapters off, no gradients)
    "preservation": {"data": {"cache_latents": True, "cache_text": True,
                              "sources": [_WORLD, {**_WORLD, "seed": 1, "preserve": True}],
                              "preservation": {"share": 0.5}}},
}


#: tiny transformers (finetune/models/tiny.py): the families block swap works on, small enough for a CPU
TINY = {"flux-tiny": "flux", "sd3-tiny": "sd3", "wan-tiny": "wan"}
#: video bases: frames per clip (Wan 2.1 1.3B at its 81 frames; the tiny Wan at 9: 3 latent frames)
VIDEO = {"wan-1.3b": 81, "wan-tiny": 9}
#: the shipped toy bases (trained weights, CPU-sized): the SD-shaped U-Net and the FLUX-shaped transformer
TOYS = ("toy", "toy-flux")
RESOLUTION = {"toy": 64, "toy-flux": 64, "flux-tiny": 64, "sd3-tiny": 64, "sd15": 512, "sdxl": 1024, "sd35m": 1024, "flux-dev": 512,
              "wan-1.3b": 480, "wan-tiny": 64}
TARGETS = {"toy": "locon", "toy-flux": "all_linear", "sd35m": "attention", "sd3-tiny": "attention", "flux-tiny": "attention_mlp",
           "flux-dev": "attention", "wan-1.3b": "attention", "wan-tiny": "attention"}


def base_recipe(model: str, batch: int, steps: int, precision: str, rank: int, adapter: str,
                quantize: str = "none", block_swap: int = 0, build: bool = True) -> dict[str, Any]:
    """The recipe every variant starts from; `quantize` (model.quantize) and `block_swap` (train.block_swap,
    with gradient checkpointing, which it needs) apply to all of them. `build=False`: name the random base's
    folder without building it (a dry run)."""
    small = model in TOYS or model in TINY
    train = {"max_steps": steps, "batch_size": batch, "lr": 1e-4, "checkpoint_every": 0,
             "mixed_precision": precision, "seed": 0}
    if block_swap:
        train |= {"block_swap": block_swap, "gradient_checkpointing": True}
    if not small:  # random weights: a stray non-finite step is skipped (its time still counts), not fatal
        train |= {"on_nan": "skip", "max_nan_skips": 1000}
    return {
        "model": {"base": model if model in TOYS else str(random_base(model, build)), "quantize": quantize,
                  **({"max_sequence_length": 32} if model in TINY or model == "toy-flux" else {}),
                  **({"max_sequence_length": 512, "guidance": 1.0} if model == "flux-dev" else {})},
        "data": _data(model, small, build),
        "method": {"name": "lora", "rank": rank, "adapter": adapter,
                   "targets": TARGETS.get(model, "attention_ff")},
        "train": train,
        "validation": {"prompts": [], "at_start": False},
        "export": {"formats": ["diffusers"], "model_card": False},
        "logging": {"report_to": [], "progress": False},
    }


def _data(model: str, small: bool, build: bool) -> dict[str, Any]:
    """The toy world's 64 px drawings, upscaled to the model's size (timing needs the shapes only); for a video
    base, clips of its frame count at its size (a square moving across: bench_clips)."""
    data: dict[str, Any] = {"resolution": RESOLUTION[model], "buckets": {"enabled": False, "min_side": 64}}
    if model not in VIDEO:
        return data | {"sources": [{"type": "toy", "subject": "world", "count": 64 if small else 16}]}
    frames = VIDEO[model]
    folder = bench_clips(frames, RESOLUTION[model], 8 if small else 4, build)
    return data | {"sources": [{"type": "frames", "path": str(folder), "fps": 16.0}],
                   "video": {"frames": frames, "fps": 16.0}}


def bench_clips(frames: int, size: int, count: int, build: bool = True) -> Path:
    """`count` clip folders of `frames` PNG frames, `size` px square: a coloured square crossing a gray field,
    captioned. Written once (temp + rename) under output/bench."""
    import shutil

    from PIL import Image, ImageDraw

    folder = ROOT / "output" / "bench" / f"clips-{frames}f-{size}px-{count}"
    if not build or folder.is_dir():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    side = size // 4
    for i in range(count):
        clip = tmp / f"clip{i:02d}"
        clip.mkdir(parents=True)
        colour = ((60 * i) % 256, 200 - 20 * i % 200, 40 + 50 * i % 200)
        for f in range(frames):
            im = Image.new("RGB", (size, size), (128, 128, 128))
            x = (size - side) * f // max(frames - 1, 1)
            ImageDraw.Draw(im).rectangle([x, size // 3, x + side, size // 3 + side], fill=colour)
            im.save(clip / f"{f:03d}.png")
        (clip / "caption.txt").write_text(f"a coloured square moving right, clip {i}")
    tmp.rename(folder)
    return folder


def random_base(model: str, build: bool = True) -> Path:
    """SD 1.5 / SDXL / SD 3.5 Medium / FLUX.1 [dev] / Wan 2.1 1.3B built from their public configs with random weights (timing
    needs no trained weights), or a tiny FLUX / SD3 / Wan transformer."""
    folder = ROOT / "output" / "bench" / f"{model}-random"
    if not build:
        return folder
    if model in TINY:
        from finetune.models.tiny import build_tiny

        return folder if (folder / "model_index.json").is_file() else build_tiny(TINY[model], folder)
    from finetune.models.reference import build_reference_base

    return build_reference_base(model, folder)


# ------------------------------------------------------------------------------------ one measurement
def measure(recipe_data: dict[str, Any], warmup: int, steps: int, profile: str | None = None) -> dict[str, Any]:
    """Run in a child process: train warmup+steps, return timings of the last `steps`. `profile`: a trace
    path; the measured steps then run under torch.profiler (phase timer off: it synchronises) and the
    result counts host syncs per step."""
    import torch

    from finetune.recipe import validate
    from finetune.train.setup import make_accelerator, quiet_libraries
    from finetune.train.trainer import Trainer

    quiet_libraries()
    recipe = validate(recipe_data)
    acc = make_accelerator(recipe)
    t = Trainer(recipe, acc)
    t.timer.enabled = profile is None
    stamps: list[float] = []
    cpu: list[float] = []  # the process's CPU seconds (all its threads) at each step: steadier than wall time
    first_step: list[float] = []
    swap_start = [0]
    original = t.train_step
    prof = StepProfile(Path(profile)) if profile else None

    def timed(batch):
        if prof:
            prof.reads.exempt(batch)  # the loader's batch stays on the host: reading it is no sync
        stepped, logs = original(batch)
        if stepped:
            stamps.append(time.perf_counter())
            cpu.append(time.process_time())
            if not first_step:
                first_step.append(time.time() - _process_start())
            if len(stamps) == warmup:
                t.timer.reset()
                swap_start[0] = t.swap.bytes_moved if t.swap is not None else 0
                if torch.cuda.is_available():  # the training peak, not the caching phase's
                    torch.cuda.reset_peak_memory_stats()
                if prof:
                    prof.start()
            if prof and len(stamps) == warmup + steps:
                prof.stop(steps)
        return stepped, logs

    t.train_step = timed
    t.run()
    wall = stamps[-1] - stamps[warmup - 1]
    out = {
        "steps": steps, "batch": recipe.train.batch_size, "step_s": wall / steps,
        "cpu_s_per_step": (cpu[-1] - cpu[warmup - 1]) / steps, "threads": torch.get_num_threads(),
        "steps_per_s": steps / wall, "images_per_s": steps * recipe.train.batch_size / wall,
        "time_to_first_step_s": first_step[0],
        "peak_host_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "phases_s": {p: t.timer.totals.get(p, 0.0) / steps for p in PHASES},
    }
    if torch.cuda.is_available():
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if prof:
        out["phases_s"] = {}
        out["profile"] = prof.result
    if t.swap is not None:  # block swap: host -> device only (never back), each block's forward and recomputation
        out["swapped_mib"] = t.swap.swapped_bytes() / 2**20
        out["swap_copied_mib_per_step"] = (t.swap.bytes_moved - swap_start[0]) / steps / 2**20
        out["swap_copied_back_mib_per_step"] = 0.0  # by construction: the device copies are dropped
    watch = getattr(t, "compile_watch", None)  # None too in a checkout before regional compile (a before run)
    if watch is not None:
        out["compile_graphs_per_step"] = watch.per_step
        out["recompiles_after_step_2"] = watch.after(2)
    return out


class StepProfile:
    """The measured steps under torch.profiler: syncs per step three ways, and a Chrome trace.

    - `host_reads`: reads of device values by the host (finetune/train/sync.py HostReads; on a CPU every
      read but the loader's batch and torch.optim's CPU step counters: an upper bound of the GPU's syncs);
    - `events`: profiler event counts per step (aten::item also counts torch.optim's CPU step counters;
      cudaStreamSynchronize / cudaMemcpy* are the GPU's own);
    - `sync_warnings` (GPU): torch.cuda.set_sync_debug_mode's warnings, one per synchronising call."""

    EVENTS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "cudaStreamSynchronize",
              "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaMemcpyAsync")

    def __init__(self, trace: Path):
        from finetune.train.sync import HostReads

        self.trace, self.reads, self.result = trace, HostReads(), {}

    def start(self) -> None:
        import warnings

        import torch
        from torch.profiler import ProfilerActivity, profile

        self.cuda = torch.cuda.is_available()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.prof = profile(activities=acts)
        self.prof.__enter__()
        self.reads.__enter__()
        self.caught = warnings.catch_warnings(record=True)
        self.warned = self.caught.__enter__()
        warnings.simplefilter("always")
        if self.cuda:
            torch.cuda.set_sync_debug_mode("warn")

    def stop(self, steps: int) -> None:
        import torch

        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
        self.caught.__exit__(None, None, None)
        self.reads.__exit__(None, None, None)
        self.prof.__exit__(None, None, None)
        counts = {e.key: e.count for e in self.prof.key_averages()}
        self.trace.parent.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(self.trace))
        syncs = [w for w in self.warned if "synchroniz" in str(w.message)]
        self.result = {
            "host_reads_per_step": self.reads.count / steps, "read_sites": dict(self.reads.sites),
            "events_per_step": {k: counts[k] / steps for k in self.EVENTS if counts.get(k)},
            "sync_warnings_per_step": len(syncs) / steps if self.cuda else None, "trace": str(self.trace),
        }


def bare_denoiser(recipe_data: dict[str, Any], warmup: int, steps: int) -> dict[str, Any]:
    """The floor: denoiser forward + backward + optimizer on ready tensors, no loop, no data."""
    import torch

    from finetune.models.components import cast_frozen, load_components
    from finetune.recipe import validate
    from finetune.train.optim import build_optimizer

    recipe = validate(recipe_data)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[recipe.train.mixed_precision]
    comps = load_components(recipe.base.complete(), recipe.model.load_options())
    method = recipe.method.build()
    groups = method.setup(comps, recipe.train.lr)
    cast_frozen(comps, dtype, dtype)
    denoiser = comps.denoiser.to(device)
    opt = build_optimizer(groups, recipe.train)
    from finetune.memory.estimate import latent_shape

    # the latents the family's own encoding makes (image or clip), sized on a meta VAE: it is not needed here
    b, frames = recipe.train.batch_size, recipe.data.video.frames if recipe.data.video is not None else 1
    comps.vae.to("meta")
    latents = torch.randn(latent_shape(comps, recipe.data.resolution, b, frames), device=device)
    with torch.no_grad():  # real conditioning shapes from the family's own encoding (on the CPU)
        text = {k: v.to(device, dtype) for k, v in comps.family.encode_prompt(comps, [""] * b, "cpu").items()}
    size = torch.tensor([[recipe.data.resolution] * 2] * b, device=device)
    batch = {"original_size": size, "target_size": size, "crop_top_left": torch.zeros_like(size)}
    t = torch.randint(1, 1000, (b,), device=device)
    t = t.float() if comps.family.objective == "flow" else t
    times, cpu = [], []
    for i in range(warmup + steps):
        _sync()
        start, cpu_start = time.perf_counter(), time.process_time()
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
            cpu.append(time.process_time() - cpu_start)
    return {"step_s": sum(times) / len(times), "cpu_s_per_step": sum(cpu) / len(cpu), "steps": steps, "batch": b,
            "threads": torch.get_num_threads()}


NOISE_SHAPES = {"sd15 512px": (4, 64, 64), "sdxl 1024px": (4, 128, 128), "flux 1024px": (16, 128, 128)}


def noise_paths(batches=(1, 4), reps: int = 50) -> list[dict[str, Any]]:
    """Each example's seeded noise, two ways, in ms per batch: drawn on the CPU (the trainer's path: the same
    numbers on every device), pinned and copied without blocking; or drawn on the GPU by a per-example
    generator (no copy, but other numbers than a CPU run's). The copy is timed to the device's completion."""
    import torch

    from finetune.train.loss import example_generator, hash_seed, host_to

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    keys = [hash_seed(0, 0, k) for k in range(max(batches))]

    def on_host(shape, b):
        return host_to(torch.stack([torch.randn(shape, generator=example_generator(k)) for k in keys[:b]]),
                       device, torch.bfloat16)

    def on_device(shape, b):
        gens = [torch.Generator(device).manual_seed(k) for k in keys[:b]]
        return torch.stack([torch.randn(shape, generator=g, device=device) for g in gens]).to(torch.bfloat16)

    rows = []
    for name, shape in NOISE_SHAPES.items():
        for b in batches:
            row = {"shape": name, "batch": b}
            for path, fn in (("cpu_pinned_ms", on_host), ("device_generator_ms", on_device)):
                if path == "device_generator_ms" and device.type != "cuda":
                    continue
                fn(shape, b)  # warm-up (pinned pool, kernels)
                _sync()
                start = time.perf_counter()
                for _ in range(reps):
                    fn(shape, b)
                _sync()
                row[path] = 1000 * (time.perf_counter() - start) / reps
            rows.append(row)
    return rows


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _process_start() -> float:
    import psutil

    return psutil.Process().create_time()


# ------------------------------------------------------------------------------------------ harness
def run_child(kind: str, recipe_data: dict[str, Any], warmup: int, steps: int, timeout: int = 3600,
              profile: Path | None = None, threads: int | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        recipe_data = json.loads(json.dumps(recipe_data))
        recipe_data["train"]["output_dir"] = str(Path(tmp) / "run")
        recipe_data["data"]["cache_dir"] = str(Path(tmp) / "cache")
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"kind": kind, "recipe": recipe_data, "warmup": warmup, "steps": steps,
                                    "profile": str(profile.resolve()) if profile else None,
                                    "threads": threads}))
        result = Path(tmp) / "result.json"
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
        cmd = [sys.executable, "-m", "finetune.bench", "--child", str(spec), str(result)]
        try:
            done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": [f"stopped after {timeout:.0f} s (the budget)"]}
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
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    if spec["kind"] == "train":
        result = measure(spec["recipe"], spec["warmup"], spec["steps"], spec.get("profile"))
    else:
        result = bare_denoiser(spec["recipe"], spec["warmup"], spec["steps"])
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--child":
    _child_main(sys.argv[2], sys.argv[3])
