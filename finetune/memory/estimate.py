"""`finetune estimate RECIPE`: the run's expected peak accelerator memory, before any weight is read.

Sizes come from the base's modules built on the meta device (finetune/memory/skeleton.py) after the recipe's
method has injected what it trains, exactly as the trainer does: frozen weights by dtype or quantized form,
trained parameters, gradients, optimizer state, activations at the recipe's resolution and batch (a meta
trace of one forward and backward through the family's own `predict`, finetune/memory/trace.py), and the
parts a cache sends back to the CPU. The peak is the larger of two phases: caching (encoders and VAE on the
device) and training (the denoiser, what stays, and one step's activations).

Not counted: the CUDA context and kernels (~0.3-0.6 GB outside torch's allocator), allocator fragmentation,
the optimizer's own temporaries, validation sampling (its activations are far below training's).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from unittest import mock

import torch

from finetune.memory.trace import LiveBytes, fused_attention, meta_safe
from finetune.models.keep_fp32 import kept_in_fp32
from finetune.models.quantize import quantizable, quantized_bytes

GB = 1024**3
DTYPE_BYTES = {"no": 4, "fp16": 2, "bf16": 2}
DTYPES_T = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: optimizer state per trained tensor. AdamW: two fp32 moments. bitsandbytes' 8-bit AdamW: two uint8 moments
#: with a fp32 scale per block of 256, tensors under 4096 values in fp32 as AdamW, and two 256-entry fp32
#: code tables shared by all (checked against the optimizer's own state in tests/test_memory.py).
#: Adafactor: factored second moment, counted as one fp32 value per row and column.
BNB_MIN_8BIT, BNB_BLOCK = 4096, 256


@dataclass
class Estimate:
    lines: list[tuple[str, int, str]] = field(default_factory=list)  # (what, bytes, how) at the training peak
    caching: int = 0  # peak while caches are filled (0: no cache)
    training: int = 0
    savings: list[tuple[str, int]] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(self.caching, self.training)

    def bytes_of(self, prefix: str) -> int:
        return sum(b for name, b, _ in self.lines if name.startswith(prefix))


def estimate(recipe, device: str = "cuda", options: bool = True) -> Estimate:
    """The recipe's peak memory on `device` ('cuda': cached parts leave it; 'cpu': everything stays)."""
    sizer = _Sizer(recipe, device)
    est = sizer.run(recipe)
    if options:
        for label, changed in memory_options(recipe):
            est.savings.append((label, est.peak - sizer.run(changed).peak))
    return est


def memory_options(recipe) -> list[tuple[str, object]]:
    """(label, recipe with one memory option changed) for every option the recipe does not use yet."""
    out = []

    def alt(label, section, **values):
        r = copy.deepcopy(recipe)
        for key, value in values.items():
            setattr(getattr(r, section), key, value)
        out.append((label, r))

    m, d, t = recipe.model, recipe.data, recipe.train
    if not recipe.method.trains_in_place():
        for kind in ("nf4", "int8", "fp8"):
            if m.quantize == "none":
                alt(f"model.quantize: {kind}", "model", quantize=kind)
    if not t.gradient_checkpointing:
        alt("train.gradient_checkpointing: true", "train", gradient_checkpointing=True)
    if t.optimizer == "adamw":
        alt("train.optimizer: adamw8bit", "train", optimizer="adamw8bit")
    if not d.cache_latents:
        alt("data.cache_latents: true", "data", cache_latents=True)
    if d.cache_text is not True and not recipe.method.trains_text_encoder():
        alt("data.cache_text: true", "data", cache_text=True)
    if t.batch_size > 1:
        alt("train.batch_size: 1", "train", batch_size=1)
    return out


class _Sizer:
    """The meta base with the method applied, and one activation trace per (checkpointing, batch)."""

    def __init__(self, recipe, device: str):
        from finetune.memory.skeleton import meta_components

        self.device = device
        self.comps = meta_components(recipe.base, recipe.model.load_options())
        self.method = recipe.method.build()
        self.method.setup(self.comps, recipe.train.lr)
        self.traces: dict[tuple, int] = {}

    def run(self, recipe) -> Estimate:
        comps, est = self.comps, Estimate()
        compute = DTYPE_BYTES[recipe.train.mixed_precision]
        vae_bytes = 4 if _vae_fp32(recipe, comps.family) else compute
        dtype = DTYPES_T[recipe.train.mixed_precision]
        experts = list(comps.experts.values())  # one denoiser, or every expert (Wan 2.2 A14B: two)
        den = sum(_weights(e, compute, recipe.model.quantize, dtype) for e in experts)
        swapped = _swapped(comps, recipe, compute)
        est.lines.append((f"denoiser weights ({_form(recipe.model.quantize, compute)})", den - swapped,
                          f"{sum(_count(e) for e in experts) / 1e9:.2f}B parameters"
                          + (f" ({len(experts)} experts)" if len(experts) > 1 else "")))
        texts = sum(_weights(e, compute, recipe.model.quantize_text_encoders, dtype) for e in comps.text_encoders)
        vae = _weights(comps.vae, vae_bytes, "none", {4: torch.float32, 2: dtype}[vae_bytes])
        text_cached = _text_cached(recipe, comps.family, self.method)
        off = self.device != "cpu"
        est.lines.append(("text encoders", 0 if (text_cached and off) else texts,
                          "released to the CPU after caching" if text_cached and off else "on the device"))
        est.lines.append(("VAE", 0 if (recipe.data.cache_latents and off) else vae,
                          "released after caching latents" if recipe.data.cache_latents and off else "on the device"))
        trained = [p for p in _trained(comps)]
        n = sum(p.numel() for p in trained)
        est.lines.append(("trained parameters (fp32)", 4 * n, f"{n / 1e6:.2f}M"))
        if recipe.train.optimizer_in_backward:  # each tensor steps and frees its gradient as soon as it is complete
            est.lines.append(("gradients (fp32)", 4 * max((p.numel() for p in trained), default=0),
                              "stepped in the backward: about one tensor's at a time"))
        else:
            est.lines.append(("gradients (fp32)", 4 * n, ""))
        est.lines.append((f"optimizer state ({recipe.train.optimizer})", _optimizer_bytes(trained, recipe), ""))
        act = self.activations(recipe) + _dequantized(comps.denoiser, compute, recipe.model.quantize)
        frames = f" x {clip_frames(recipe)} frames" if recipe.data.video is not None else ""
        est.lines.append(("activations (one step)", act, f"{recipe.data.resolution} px{frames}, batch {recipe.train.batch_size}"
                          + (", checkpointed" if recipe.train.gradient_checkpointing else "")))
        if not recipe.data.cache_latents:  # each step encodes its batch first (freed before the denoiser runs)
            est.lines[-1] = (est.lines[-1][0], max(act, self.encode(recipe, recipe.train.batch_size)), est.lines[-1][2])
        est.training = sum(b for _, b, _ in est.lines)
        if recipe.data.cache_latents or text_cached:
            resident = texts + vae + (den if recipe.data.prior is not None or not off else 0)
            est.caching = resident + (self.encode(recipe, 1) if recipe.data.cache_latents else 0)
        return est

    def encode(self, recipe, batch: int) -> int:
        key = ("vae", batch, recipe.data.resolution, _vae_fp32(recipe, self.comps.family))
        if key not in self.traces:
            dtype = torch.float32 if key[-1] else DTYPES_T[recipe.train.mixed_precision]
            self.traces[key] = trace_encode(self.comps.vae.to(dtype), recipe, batch, self.comps.family)
        return self.traces[key]

    def activations(self, recipe) -> int:
        key = (recipe.train.gradient_checkpointing, recipe.train.batch_size, recipe.data.resolution,
               recipe.train.mixed_precision)
        if key not in self.traces:
            self.traces[key] = trace_step(self.comps, recipe)
        return self.traces[key]


def trace_step(comps, recipe) -> int:
    """Peak bytes one training step adds on top of the resident weights: the family's `predict` and the loss,
    forward and backward, on the meta device (fused attention, as on the accelerator)."""
    dtype = DTYPES_T[recipe.train.mixed_precision]
    den, b = comps.denoiser, recipe.train.batch_size
    device = next(den.parameters()).device  # meta for the estimate; the tests also run it on real tensors
    trained = list(_trained(comps))
    for p in trained:  # autocast runs the adapters in the compute dtype; their fp32 masters are counted apart
        p.data = p.data.to(dtype)
        p.grad = torch.empty_like(p)  # gradients are counted apart too
    # frozen weights in the compute dtype, as the trainer casts them (a meta base is built in fp32)
    kept = kept_in_fp32(den, dtype)
    cast = [(p, p.dtype) for p in den.parameters() if not p.requires_grad and p.dtype.is_floating_point
            and p.dtype != dtype and p.element_size() > 1 and id(p) not in kept]
    for p, _ in cast:
        p.data = p.data.to(dtype)
    den.train()
    if recipe.train.gradient_checkpointing:
        from finetune.models.offload import checkpoint_block

        den.enable_gradient_checkpointing(checkpoint_block)
    with torch.no_grad(), meta_safe():
        text = comps.family.encode_prompt(comps, ["a photo"] * b, device) if comps.text_encoders else {}
    text = {k: v.to(dtype) for k, v in text.items()}
    shape = latent_shape(comps, recipe.data.resolution, b, clip_frames(recipe))
    size = torch.tensor([[recipe.data.resolution] * 2] * b, device=device)
    batch = {"original_size": size, "crop_top_left": size * 0, "target_size": size, "guidance": 1.0}
    with mock.patch("torch.nn.functional.scaled_dot_product_attention", fused_attention), LiveBytes() as live, \
            meta_safe():
        noisy = torch.randn(shape, device=device, dtype=dtype)
        timesteps = torch.rand(b, device=device) * 1000
        pred = comps.family.predict(den, noisy, timesteps, text, batch)
        loss = torch.nn.functional.mse_loss(pred.float(), torch.randn_like(pred, dtype=torch.float32))
        loss.backward()
    for p in trained:
        p.grad = None
        p.data = p.data.float()
    for p, was in cast:
        p.data = p.data.to(was)
    if recipe.train.gradient_checkpointing:
        den.disable_gradient_checkpointing()
    return live.peak


def latent_shape(comps, resolution: int, batch: int, frames: int = 1) -> tuple[int, ...]:
    """The latents the family's `encode_latents` makes of `batch` square images or clips of `frames` (a meta VAE:
    shapes only): 16 channels at 1/8 for FLUX.1, 128 at 1/16 for FLUX.2's patchified latents, one frame of
    Qwen-Image's video VAE, Wan's (frames - 1) / 4 + 1 latent frames."""
    vae = comps.vae
    p = next(vae.parameters())
    with torch.no_grad():
        pixels = torch.zeros(_pixels(batch, resolution, frames), device=p.device, dtype=p.dtype)
        return tuple(comps.family.encode_latents(vae, pixels).shape)


def _pixels(batch: int, side: int, frames: int) -> tuple[int, ...]:
    """A batch of images [B, 3, H, W], or of clips [B, 3, F, H, W] (a video recipe)."""
    return (batch, 3, side, side) if frames == 1 else (batch, 3, frames, side, side)


# ------------------------------------------------------------------------------------------- sizes
def _weights(module: torch.nn.Module, compute: int, kind: str, dtype: torch.dtype | None = None) -> int:
    """Bytes of a module's frozen weights in the compute dtype (`dtype`, `compute` bytes each) or quantized
    form, trained parameters apart; weights the libraries keep in fp32 at that dtype count 4 bytes (T5's `wo`
    in fp16: finetune/models/keep_fp32.py)."""
    total = 0
    quantized = set()
    kept = kept_in_fp32(module, dtype) if dtype is not None else set()
    if kind != "none":
        for _, layer in quantizable(module):
            total += quantized_bytes(kind, layer.weight.shape)
            quantized.add(layer.weight)
            if layer.bias is not None:
                total += layer.bias.numel() * (1 if kind == "fp8" else compute)  # layerwise casting: fp8 too
                quantized.add(layer.bias)
    for p in module.parameters():
        if p not in quantized and not p.requires_grad:
            total += p.numel() * (4 if id(p) in kept else compute)
    return total + sum(b.numel() * b.element_size() for b in module.buffers())


def trace_encode(vae, recipe, batch: int, family=None) -> int:
    """Peak bytes the VAE's encoder adds for `batch` images (or clips) at the recipe's resolution (no gradients), through
    the family's own `encode_latents` (one frame for Qwen-Image's video VAE, FLUX.2's patchify)."""
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    side = recipe.data.resolution
    encode = family.encode_latents if family is not None else (lambda v, x: v.encode(x).latent_dist.mode())
    with torch.no_grad(), mock.patch("torch.nn.functional.scaled_dot_product_attention", fused_attention), \
            LiveBytes() as live:
        encode(vae, torch.randn(_pixels(batch, side, clip_frames(recipe)), device=device, dtype=dtype))
    return live.peak


def clip_frames(recipe) -> int:
    """Frames per training clip (1: images)."""
    return recipe.data.video.frames if recipe.data.video is not None else 1


def _dequantized(module, compute: int, kind: str) -> int:
    """nf4 / int8 layers dequantize their weight to the compute dtype for each matmul: the largest one is
    transient memory on top of the activations."""
    if kind not in ("nf4", "int8"):
        return 0
    return max((layer.weight.numel() * compute for _, layer in quantizable(module)), default=0)


def _trained(comps):
    seen = set()
    for module in comps.named_modules().values():
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                yield p


def _optimizer_bytes(trained, recipe) -> int:
    sizes = [p.numel() for p in trained]
    if recipe.train.optimizer == "adamw":
        return 8 * sum(sizes)
    if recipe.train.optimizer == "adamw8bit":
        return 2 * 256 * 4 + sum(8 * n if n < BNB_MIN_8BIT else 2 * n + 8 * math.ceil(n / BNB_BLOCK) for n in sizes)
    return sum(4 * (sum(p.shape[-2:]) if p.ndim >= 2 else p.numel()) for p in trained)  # adafactor


def _swapped(comps, recipe, compute: int) -> int:
    """`train.block_swap`: the swapped blocks' frozen weights live on the CPU, less the one block streamed in."""
    if not recipe.train.block_swap:
        return 0
    from finetune.models.offload import swappable_blocks

    total = 0
    for expert in comps.experts.values():  # each expert streams its own last blocks
        blocks = swappable_blocks(expert, comps.family)[-recipe.train.block_swap:]
        sizes = [_weights(b, compute, recipe.model.quantize, DTYPES_T[recipe.train.mixed_precision]) for b in blocks]
        total += sum(sizes) - max(sizes)
    return total


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _form(kind: str, compute: int) -> str:
    return kind if kind != "none" else {4: "fp32", 2: "16-bit"}[compute]


def _vae_fp32(recipe, family) -> bool:
    choice = recipe.model.vae_dtype
    if choice != "auto":
        return choice == "fp32"
    return recipe.train.mixed_precision == "no" or family.vae_fp16_unsafe


def _text_cached(recipe, family, method) -> bool:
    """What the trainer decides for `data.cache_text` (finetune/train/trainer.py `_resolve_text_cache`), and
    whether the encoders then leave the device (families with large encoders)."""
    from finetune.train.setup import resolve_text_cache

    return resolve_text_cache(recipe, family, method) and family.cache_text_by_default


def report(recipe, est: Estimate, device: str = "cuda") -> str:
    """The estimate as a table: each part, the two phases, and what each memory option would save."""
    rows = [f"memory estimate for {recipe.model.base} ({recipe.method.name}, {recipe.data.resolution} px, "
            f"batch {recipe.train.batch_size}, {recipe.train.mixed_precision}) on {device}:"]
    rows += [f"  {name:<38} {b / GB:8.2f} GB  {how}" for name, b, how in est.lines]
    rows.append(f"  {'= training peak':<38} {est.training / GB:8.2f} GB")
    if est.caching:
        rows.append(f"  {'caching phase (encoders + VAE)':<38} {est.caching / GB:8.2f} GB")
    rows.append(f"  expected peak {est.peak / GB:.2f} GB allocated (+ ~0.5 GB CUDA context on a GPU)")
    useful = [(label, saved) for label, saved in est.savings if saved > 0]
    if useful:
        rows.append("  options not used yet (peak saved):")
        rows += [f"    {label:<36} -{saved / GB:7.2f} GB" for label, saved in sorted(useful, key=lambda x: -x[1])]
    return "\n".join(rows)
