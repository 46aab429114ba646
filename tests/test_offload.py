"""Block swap (`train.block_swap`) on tiny FLUX and SD3 transformers: training with the last blocks' frozen
weights streamed in gives the same losses and the same LoRA as without, and between uses those weights are
their CPU home copies (the copy a block computed with is gone once its backward is done).

No GPU here: the 'device' is the CPU too, so the test cannot see bytes leave an accelerator. What it checks
is what makes them leave one: the pre-hook gives the block a fresh copy of each frozen weight for every
forward (and for the recomputed forward of its backward), and afterwards the parameter points at its home
tensor again and no other copy is alive."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import draw_images, write_recipe

STEPS = 3


@pytest.fixture(scope="module", params=["flux", "sd3", "wan"])
def tiny_transformer(request, tmp_path_factory) -> tuple[str, Path]:
    from finetune.models.tiny import build_tiny

    kind = request.param
    return kind, build_tiny(kind, tmp_path_factory.mktemp("tiny") / kind)


def swap_trainer(tmp_path: Path, base: Path, kind: str, swap: int, quantize: str = "none"):
    from finetune.recipe import load_recipe
    from finetune.train.setup import make_accelerator
    from finetune.train.trainer import Trainer

    targets = {"flux": "attention_mlp", "wan": "attention_ffn"}.get(kind, "attention")
    path = write_recipe(tmp_path, base, draw_images(tmp_path / "images", n=4),
                        model={"max_sequence_length": 16, "quantize": quantize}, data={"cache_latents": True},
                        method={"rank": 4, "alpha": 4, "targets": targets},
                        train={"max_steps": STEPS, "lr": 1e-2, "seed": 3, "gradient_checkpointing": True,
                               "block_swap": swap})
    recipe = load_recipe(path)
    return Trainer(recipe, make_accelerator(recipe))


def losses(out: Path) -> list[float]:
    return [float(line.split(",")[1]) for line in (out / "logs" / "loss.csv").read_text().splitlines()[1:]]


@pytest.mark.parametrize("quantize, prefetch", [("none", False), ("fp8", False), ("none", True)])
def test_block_swap_trains_the_same_and_keeps_blocks_home(tmp_path, tiny_transformer, quantize, prefetch,
                                                          monkeypatch):
    """(fp8: the swapped weights are the fp8-stored ones, and diffusers' layerwise casting upcasts the copy;
    prefetch: the next block's upload is queued when a block starts, as on CUDA with its side stream)"""
    import finetune.models.offload as offload
    from finetune.models.offload import swappable_blocks

    class Swap(offload.BlockSwap):
        def __init__(self, *args):
            super().__init__(*args, prefetch=prefetch)

    monkeypatch.setattr(offload, "BlockSwap", Swap)
    kind, base = tiny_transformer
    plain = swap_trainer(tmp_path / "plain", base, kind, 0, quantize)
    plain.run()
    t = swap_trainer(tmp_path / "swap", base, kind, 2, quantize)
    assert t.swap.prefetch == prefetch
    swap, den = t.swap, t.comps.denoiser
    blocks = swappable_blocks(den, t.comps.family)
    assert swap.blocks == blocks[-2:] and len(swap.home) > 0
    frozen = [p for b in swap.blocks for p in b.parameters() if not p.requires_grad]
    assert set(frozen) == set(swap.home)  # every frozen weight of the swapped blocks, no trained one
    assert all(not p.requires_grad for p in swap.home)
    if quantize == "fp8":
        assert any(home.dtype == torch.float8_e4m3fn for home in swap.home.values())

    seen: dict[int, list[bool]] = {}  # for each swapped block: during its forward, were its weights a copy?
    copies = []  # weak references to the copies' storages (a storage's Python object lives as long as it)

    def watch(i):
        def hook(block, args, kwargs):
            frozen = swap._frozen(block)
            seen.setdefault(i, []).append(all(p.data_ptr() != swap.home[p].data_ptr() for p in frozen))
            copies.extend(weakref.ref(p.untyped_storage()) for p in frozen)
        return hook

    for i, block in enumerate(swap.blocks):  # registered after the swap's pre-hook: runs once it has copied
        block.register_forward_pre_hook(watch(i), with_kwargs=True)
    t.run()

    # the same run: losses and the exported LoRA agree to float tolerance
    a, b = losses(plain.out), losses(t.out)
    assert len(a) == len(b) == STEPS
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-6, (a, b)
    la, lb = (load_file(r.out / "pytorch_lora_weights.safetensors") for r in (plain, t))
    assert la.keys() == lb.keys() and la
    assert max(float((la[k] - lb[k]).abs().max()) for k in la) < 1e-6
    assert max(float(lb[k].abs().max()) for k in lb if "lora_B" in k or "lora_up" in k) > 1e-4  # it trained

    # every forward of a swapped block ran on a fresh copy: once forward, once recomputed in the backward
    assert {i: len(v) for i, v in seen.items()} == {0: 2 * STEPS, 1: 2 * STEPS}
    assert all(all(v) for v in seen.values())
    assert swap.loads == 2 * STEPS * len(swap.blocks)
    # one way: each block uploaded for its forward and its recomputation, nothing else (a prefetched copy is
    # one of those uploads, made a block earlier)
    assert swap.bytes_moved == 2 * STEPS * swap.swapped_bytes()
    assert swap.prefetched == (2 * STEPS * (len(swap.blocks) - 1) if prefetch else 0)
    # between uses: every swapped weight is its home tensor again, and no copy of it is alive anywhere
    assert all(p.data_ptr() == home.data_ptr() for p, home in swap.home.items())
    assert swap.resident == 0
    sizes = [sum(p.numel() * p.element_size() for p in swap._frozen(b)) for b in swap.blocks]
    pairs = [a + b for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    assert swap.max_resident == (max(pairs) if prefetch else max(sizes))  # one block at a time, or it and the next
    assert not swap.pending
    gc.collect()
    assert len(copies) == 2 * STEPS * len(swap.home) and not [r for r in copies if r() is not None]
