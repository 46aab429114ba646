"""Second build stage: pretrain the toy U-Net on the world and write the diffusers folder.

The text encoder stays randomly initialised and frozen: a random CLIP still maps different prompts
to different token states, which is all cross-attention needs, and it keeps the build short. Held-out
subjects never appear here, so fine-tuning tests can tell learning from remembering.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import time

import torch
import torch.nn.functional as F

from finetune.export.io import replace_folder
from finetune.toy import world
from finetune.toy.build import SCHEDULER_CONFIG, TEXT_CONFIG, UNET_CONFIG, encode_all, log, to_tensor
from finetune.toy.build_flux_train import optimizer_step


def make_text_encoder(seed: int):
    """Random CLIP text encoder, rounded through fp16 so the shipped fp16 weights are the trained-with ones."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    te = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)).half().float()
    return te.eval().requires_grad_(False)


@torch.no_grad()
def embed_captions(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    """Last hidden states (N, 77, hidden) for each caption, padded to 77 like the SD pipeline does."""
    out = []
    for i in range(0, len(captions), 256):
        ids = tokenizer(
            captions[i : i + 256],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        out.append(text_encoder(ids)[0])
    return torch.cat(out)


def prepare_data(vae, tokenizer, text_encoder, n_images: int, seed: int) -> dict:
    """Latent moments of every image and the text embedding of every distinct caption."""
    records = world.world_records(n_images, seed=seed + 1)
    means, stds = encode_all(vae, to_tensor(world.to_array([img for img, _ in records])))
    table = [""] + sorted({c for _, caps in records for c in caps})  # row 0 = empty prompt for CFG dropout
    index = {c: i for i, c in enumerate(table)}
    caps = torch.tensor([[index[c] for c in caps] for _, caps in records])
    emb = embed_captions(tokenizer, text_encoder, table)
    log(f"data: {n_images} images, {len(table)} distinct captions, latents {tuple(means.shape[1:])}")
    return {"means": means, "stds": stds, "caps": caps, "emb": emb}


def train_unet(
    data: dict,
    steps: int,
    seed: int,
    batch: int = 32,
    lr: float = 8e-4,
    uncond: float = 0.1,
    init: pathlib.Path | None = None,
):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel, compute_snr

    torch.manual_seed(seed)
    if init is not None:  # continue from a saved model: a second cosine cycle (a warm restart)
        unet = UNet2DConditionModel.from_pretrained(init / "unet").float().train()
    else:
        unet = UNet2DConditionModel(**UNET_CONFIG)
    ema = EMAModel(unet.parameters(), decay=0.999)
    noise_sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    warm = 100 if init is None else 50
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / steps)).item()),
    )
    log(
        f"U-Net: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M params, {steps} steps at batch {batch}"
    )
    gen = torch.Generator().manual_seed(seed)
    n = len(data["means"])
    t0, running = time.time(), 0.0
    for step in range(1, steps + 1):
        idx = torch.randint(n, (batch,), generator=gen)
        latents = data["means"][idx] + data["stds"][idx] * torch.randn(
            data["means"][idx].shape, generator=gen
        )
        variant = torch.randint(data["caps"].shape[1], (batch,), generator=gen)
        cap = data["caps"][idx, variant]
        cap[torch.rand(batch, generator=gen) < uncond] = 0  # empty prompt, so classifier-free guidance works
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(noise_sched.config.num_train_timesteps, (batch,), generator=gen)
        pred = unet(noise_sched.add_noise(latents, noise, t), t, data["emb"][cap]).sample
        # Min-SNR-5 weighting: near-clean timesteps stop dominating, which speeds up learning the
        # coarse layout (shape, colour) that the prompts control.
        snr = compute_snr(noise_sched, t)
        loss = (
            F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * snr.clamp(max=5.0) / snr
        ).mean()
        optimizer_step(unet, opt, sched, ema, loss)
        running = 0.98 * running + 0.02 * loss.item() if step > 1 else loss.item()
        if step % 100 == 0 or step == steps:
            el = time.time() - t0
            log(f"U-Net step {step}/{steps} loss {running:.4f} ({el:.0f} s, {el / step:.3f} s/step)")
    ema.copy_to(unet.parameters())  # the EMA weights sample cleaner than the last step's
    return unet.eval().requires_grad_(False)


def save_pipeline(out: pathlib.Path, vae, text_encoder, tokenizer, unet, info: dict) -> None:
    """Write the diffusers folder atomically: build it next to `out`, then swap it in."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder.half(),
        tokenizer=tokenizer,
        unet=unet.half(),
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    ship_tokenizer(pathlib.Path(tokenizer.name_or_path), tmp / "tokenizer")
    (tmp / "toy_build.json").write_text(json.dumps(info, indent=2) + "\n")
    replace_folder(tmp, out)
    text_encoder.float()
    unet.float()
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    log(f"wrote {out} ({size:.1f} MB)")


def ship_tokenizer(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Ship the tokenizer as CLIP's own vocab.json + merges.txt (1.5 MB, read by slow and fast
    tokenizers alike) instead of the 3.6 MB tokenizer.json that save_pretrained writes."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(src / name, dst / name)


def build_unet_stage(
    workdir: pathlib.Path,
    out: pathlib.Path,
    steps: int,
    seed: int,
    n_images: int = 24000,
    lr: float = 8e-4,
    resume: bool = False,
) -> None:
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    t0 = time.time()
    tokenizer = CLIPTokenizer.from_pretrained(workdir / "tokenizer")
    vae = AutoencoderKL.from_pretrained(workdir / "vae").eval().requires_grad_(False)
    text_encoder = make_text_encoder(0)  # fixed: the U-Net is trained against this exact encoder
    # The world images stay those of seed 0's build, so a resumed run trains on the same data.
    data = prepare_data(vae, tokenizer, text_encoder, n_images, seed=0)
    history = json.loads((out / "toy_build.json").read_text())["unet_runs"] if resume else []
    unet = train_unet(data, steps, seed, lr=lr, init=out if resume else None)
    history.append(
        {
            "seed": seed,
            "steps": steps,
            "lr": lr,
            "resumed": resume,
            "images": n_images,
            "minutes": round((time.time() - t0) / 60, 1),
        }
    )
    info = {"unet_runs": history, "batch": 32}
    save_pipeline(out, vae, text_encoder, tokenizer, unet, info)
