"""`finetune estimate`: quantized sizes against bitsandbytes' own tensors, the meta trace against the same
step on real tensors, and the whole estimate against the peak the CPU allocator reports for a real run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import draw_images, write_recipe


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory) -> Path:
    from finetune.models.tiny import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny") / "flux")


def stored_bytes(module: torch.nn.Module) -> int:
    """Every byte a module holds: parameters, buffers, bitsandbytes' scales (quant_state, SCB)."""
    def state(qs) -> int:
        own = sum(v.numel() * v.element_size() for v in (qs.absmax, qs.code, qs.offset) if isinstance(v, torch.Tensor))
        return own + (state(qs.state2) if getattr(qs, "state2", None) is not None else 0)

    total = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    for p in module.parameters():
        if getattr(p, "quant_state", None) is not None:
            total += state(p.quant_state)
        if isinstance(getattr(p, "SCB", None), torch.Tensor):
            total += p.SCB.numel() * p.SCB.element_size()
    return total


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("shape", [(3072, 3072), (12288, 3072), (640, 320)])
def test_quantized_size_matches_bitsandbytes(kind, shape):
    pytest.importorskip("bitsandbytes")
    from finetune.models.quantize import quantize_module, quantized_bytes

    layer = torch.nn.Sequential(torch.nn.Linear(shape[1], shape[0], bias=False)).requires_grad_(False)
    quantize_module(layer, kind, torch.bfloat16, device="cpu")
    real = stored_bytes(layer)
    assert abs(quantized_bytes(kind, shape) - real) / real < 0.002, (quantized_bytes(kind, shape), real)


def test_meta_trace_equals_the_real_step(tiny_flux):
    """The activation trace runs on the meta device; the same step on real CPU tensors holds the same bytes."""
    from finetune.memory.estimate import trace_step
    from finetune.memory.skeleton import meta_components
    from finetune.models.components import load_components
    from finetune.recipe import validate

    recipe = validate({"model": {"base": str(tiny_flux), "max_sequence_length": 16},
                       "data": {"sources": [{"type": "folder", "path": str(tiny_flux)}], "resolution": 128},
                       "method": {"name": "lora", "rank": 4}, "train": {"batch_size": 2}}, Path("r.yaml"), set())
    comps = meta_components(recipe.base, recipe.model.load_options())
    recipe.method.build().setup(comps, 1e-3)
    meta = trace_step(comps, recipe)
    real = load_components(recipe.base, recipe.model.load_options())
    recipe.method.build().setup(real, 1e-3)
    assert trace_step(real, recipe) == meta
    assert meta > 1_000_000


def profiled_peak(fn) -> int:
    """Peak bytes the CPU allocator held during fn() beyond what it held before (torch's profiler sees every
    allocation and free)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []

    def walk(node):
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def held_storages() -> dict[int, int]:
    """{address: bytes} of every CPU tensor storage alive now (each storage once)."""
    import gc

    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            try:
                st = obj.untyped_storage()
                storages[st.data_ptr()] = st.nbytes()
            except (RuntimeError, NotImplementedError):  # a fake / functional tensor an earlier compile left: no
                continue  # memory of its own
    return storages


def new_bytes(before: dict[int, int]) -> int:
    """Bytes of the storages alive now that were not alive at `before` (what earlier tests in this process
    left behind, or free meanwhile, does not count either way)."""
    return sum(n for ptr, n in held_storages().items() if before.get(ptr) != n)


@pytest.mark.parametrize("kind", ["none", "nf4"])
def test_estimate_within_15_percent_of_a_real_run(tmp_path, tiny_flux, kind):
    """A toy FLUX LoRA run on the CPU (fp32; nf4 base): the estimate's training peak for device 'cpu' (nothing
    leaves the host) against the measured one: every tensor held once set-up is done, plus the peak the CPU
    allocator reports over the training steps (loading happens on the host on a GPU too, and is not counted)."""
    if kind != "none":
        pytest.importorskip("bitsandbytes")
    from finetune.memory.estimate import estimate
    from finetune.recipe import load_recipe
    from finetune.train.setup import make_accelerator
    from finetune.train.trainer import Trainer

    path = write_recipe(tmp_path, tiny_flux, draw_images(tmp_path / "images", n=4, size=128),
                        model={"quantize": kind, "max_sequence_length": 16},
                        data={"resolution": 128, "cache_latents": True},
                        method={"rank": 8, "alpha": 8, "targets": "attention_mlp"},
                        train={"max_steps": 2, "checkpoint_every": 0}, export={"formats": []})
    recipe = load_recipe(path)
    est = estimate(recipe, device="cpu", options=False)
    before = held_storages()  # whatever earlier tests left alive in this process (the test files before this
    t = Trainer(recipe, make_accelerator(recipe))  # one on its test process differ from run to run)
    held = new_bytes(before)
    measured = held + profiled_peak(t.run)
    print(f"{kind}: estimate {est.training:,} B, measured {measured:,} B ({est.training / measured - 1:+.1%}; "
          f"held after set-up {held:,} B)", {name: b for name, b, _ in est.lines})
    assert abs(est.training - measured) / measured < 0.15


def test_estimate_command_prints_the_table_and_savings(tmp_path, tiny_flux, capsys):
    from finetune.run import main

    path = write_recipe(tmp_path, tiny_flux, draw_images(tmp_path / "images", n=2),
                        model={"max_sequence_length": 16}, method={"targets": "attention_mlp"})
    main(["estimate", str(path), "train.batch_size=4"])
    out = capsys.readouterr().out
    assert "batch 4" in out and "expected peak" in out
    assert "model.quantize: nf4" in out and "train.batch_size: 1" in out
    assert not (tmp_path / "out").exists()  # nothing loaded, nothing written


REFERENCE = {"sd15": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "attention_ff", 512),
             "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", "attention_ff", 1024),
             "flux1-dev": ("black-forest-labs/FLUX.1-dev", "attention_mlp", 1024)}


def optimizer_state_bytes(groups, recipe) -> int:
    """Build the recipe's real optimizer over CPU tensors shaped like the trained parameters, take one step,
    and add up its state (each storage once: 8-bit AdamW shares its code tables)."""
    from finetune.train.optim import build_optimizer

    groups = [{**g, "params": [torch.nn.Parameter(torch.zeros(p.shape)) for p in g["params"]]} for g in groups]
    for g in groups:
        for p in g["params"]:
            p.grad = torch.zeros(p.shape)
    opt = build_optimizer(groups, recipe.train)
    opt.step()
    storages = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes() for s in opt.state.values()
                for v in s.values() if isinstance(v, torch.Tensor) and v.ndim > 0}
    return sum(storages.values())


@pytest.mark.slow
@pytest.mark.parametrize("model", list(REFERENCE))
def test_reference_architectures_parameter_and_state_bytes(tmp_path, model):
    """SD 1.5, SDXL and FLUX.1 [dev] (not cached here: the reference architectures on the meta device), LoRA
    rank 16, bf16: the estimate's weights, trained parameters, gradients and optimizer state (AdamW and 8-bit
    AdamW) against counts taken apart from it: the injected meta modules' own parameters and the state the
    real optimizers create for tensors of the trained shapes. The denoisers' sizes match the published ones."""
    pytest.importorskip("bitsandbytes")
    import copy

    from finetune.memory.estimate import _Sizer
    from finetune.memory.skeleton import meta_components
    from finetune.recipe import validate
    from tests.published import PUBLISHED

    base, targets, res = REFERENCE[model]
    recipe = validate({"model": {"base": base},
                       "data": {"sources": [{"type": "folder", "path": str(tmp_path)}], "resolution": res,
                                "cache_latents": True, "cache_text": True},
                       "method": {"name": "lora", "rank": 16, "targets": targets},
                       "train": {"batch_size": 1, "mixed_precision": "bf16", "gradient_checkpointing": True}},
                      Path("r.yaml"), set())
    comps = meta_components(recipe.base)
    groups = recipe.method.build().setup(comps, 1e-4)
    den = comps.denoiser
    published = PUBLISHED[model][comps.family.denoiser_name]  # the published checkpoints' counts
    assert sum(p.numel() for p in den.parameters() if not p.requires_grad) == published
    trained = sum(p.numel() for g in groups for p in g["params"])
    measured = {"weights": 2 * published + sum(b.numel() * b.element_size() for b in den.buffers()),
                "trained": 4 * trained, "gradients": 4 * trained}
    recipe8 = copy.deepcopy(recipe)
    recipe8.train.optimizer = "adamw8bit"
    measured["adamw"] = optimizer_state_bytes(groups, recipe)
    measured["adamw8bit"] = optimizer_state_bytes(groups, recipe8)

    sizer = _Sizer(recipe, "cuda")
    est, est8 = sizer.run(recipe), sizer.run(recipe8)
    estimated = {"weights": est.bytes_of("denoiser weights"), "trained": est.bytes_of("trained parameters"),
                 "gradients": est.bytes_of("gradients"), "adamw": est.bytes_of("optimizer state"),
                 "adamw8bit": est8.bytes_of("optimizer state")}
    for key in measured:
        print(f"{model} {key}: estimate {estimated[key]:,} B, measured {measured[key]:,} B "
              f"({estimated[key] / measured[key] - 1:+.3%})")
        assert abs(estimated[key] / measured[key] - 1) < 0.01, key  # (the issue asks 15%; these are counts)
    print(f"{model}: trained {trained:,} parameters; activations {est.bytes_of('activations'):,} B; "
          f"training peak {est.training:,} B (adamw), {est8.training:,} B (adamw8bit)")
