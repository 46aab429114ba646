#!/usr/bin/env python3
"""What base-prediction preservation adds to a training step on the real SD 1.5 U-Net shape (random weights).

    python tools/preservation_cost.py                 # 256 px, batch 2, share 0.5, on CPU or the first GPU
    python tools/preservation_cost.py --side 64 --batch 4   # 512 px latents

Times one LoRA training step (forward, backward, AdamW) against the extra forward the preservation examples
need (adapters off, no gradients), best of --repeats; tools/bench.py measures the whole trainer on the toy base.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", type=int, default=32, help="latent side (32 = 256 px, 64 = 512 px)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--share", type=float, default=0.5, help="share of the batch that needs the base's prediction: "
                   "preservation examples, or (1.0) every image masked with unmasked_target: base")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from finetune.models import reference
    from finetune.train.preserve import adapters_off

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**reference.SD15_UNET).to(dev).requires_grad_(False)
    unet.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=[
        "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]))
    opt = torch.optim.AdamW([q for q in unet.parameters() if q.requires_grad], lr=1e-4)
    n = max(1, round(a.batch * a.share))
    x = torch.randn(a.batch, 4, a.side, a.side, device=dev)
    t = torch.randint(0, 1000, (a.batch,), device=dev)
    text = torch.randn(a.batch, 77, 768, device=dev)

    def timed(fn) -> float:
        if dev == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if dev == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def step():
        unet(x, t, text).sample.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()

    def base():
        with torch.no_grad(), adapters_off([unet]):
            unet(x[:n], t[:n], text[:n])

    step(), base()  # warm-up
    train = min(timed(step) for _ in range(a.repeats))
    extra = min(timed(base) for _ in range(a.repeats))
    print(f"SD 1.5 U-Net on {dev}, LoRA r16 attention_ff, {a.side * 8} px, batch {a.batch}: step {train:.3f}s; "
          f"base forward on {n} of {a.batch} examples {extra:.3f}s (+{100 * extra / train:.0f}% per step)")


if __name__ == "__main__":
    main()
