"""Build the toy base model: tokenizer, frozen random text encoder, VAE and U-Net trained on the world.

Used by `tools/make_toy_model.py`; kept in the package so the architecture is written down in one
place (tests and the lead's trainers can build the same shapes without weights). Build-time only:
nothing here runs when the committed model is loaded.
"""

from __future__ import annotations

import gzip
import json
import math
import pathlib
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from finetune.toy import world

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    sample_size=64,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    mid_block_add_attention=False,  # attention at 16x16 would dominate CPU time and adds little here
    scaling_factor=1.0,  # latents are standardised inside the VAE (see fold_latent_stats), so 1.0 is exact
)
# Cross-attention only at 4x4 and in the mid-block: attention at 16x16 costs 4x the step time on CPU.
UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64, 128),
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=16,
)
TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=64,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- tokenizer
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character table, needed to write the BPE vocabulary."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def fetch_clip_bpe(workdir: pathlib.Path) -> pathlib.Path:
    """The real CLIP BPE merges file, taken from the open_clip_torch wheel (no model hub needed)."""
    import zipfile

    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "open_clip_torch", "-d", str(workdir)],
        check=True,
    )
    wheel = next(workdir.glob("open_clip_torch-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith("bpe_simple_vocab_16e6.txt.gz"))
        out = workdir / "bpe_simple_vocab_16e6.txt.gz"
        out.write_bytes(zf.read(name))
    return out


def write_clip_tokenizer(bpe_gz: pathlib.Path, out_dir: pathlib.Path):
    """vocab.json + merges.txt exactly as OpenAI's CLIP builds them, saved as a CLIPTokenizer."""
    from transformers import CLIPTokenizer

    merges = gzip.open(bpe_gz).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    # vocab.json + merges.txt serve slow tokenizers; save_pretrained adds tokenizer.json for fast ones.
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(
        vocab=str(out_dir / "vocab.json"),
        merges=str(out_dir / "merges.txt"),
        pad_token="<|endoftext|>",
        model_max_length=77,
    )
    tok.save_pretrained(out_dir)
    return tok


# ---------------------------------------------------------------------------------------------- VAE
def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1], the range diffusers' VAE expects."""
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def train_vae(n_images: int, steps: int, seed: int, batch: int = 16, lr: float = 1e-3):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    data = to_tensor(world.to_array(world.vae_images(n_images, seed=seed)))
    log(
        f"VAE: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M params, {len(data)} images, {steps} steps"
    )
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(1, steps + 1):
        x = data[torch.randint(len(data), (batch,), generator=gen)]
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.sample(generator=gen)).sample
        # A tiny KL keeps the latent space smooth without blurring the 64 px reconstructions.
        loss = F.mse_loss(rec, x) + 1e-5 * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps:
            psnr = 10 * math.log10(4.0 / F.mse_loss(rec, x).item())
            log(
                f"VAE step {step}/{steps} loss {loss.item():.4f} psnr {psnr:.1f} dB ({time.time() - t0:.0f} s)"
            )
    vae.eval().requires_grad_(False)
    return vae, data


@torch.no_grad()
def fold_latent_stats(vae, images: torch.Tensor) -> dict:
    """Standardise the latents per channel inside the VAE's 1x1 quant convs.

    The standard StableDiffusionPipeline only divides by a scalar `scaling_factor` (no per-channel
    shift), and our trained latents have channel means far from zero. Folding mean/std into
    quant_conv (encoder side) and post_quant_conv (decoder side) is exact, so encode() returns
    zero-mean unit-variance latents and scaling_factor stays 1.0 for every training loop.
    """
    mean = torch.cat([vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
    mu, sigma = mean.mean(dim=(0, 2, 3)), mean.std(dim=(0, 2, 3))
    c = mu.numel()
    q = vae.quant_conv
    q.weight[:c] /= sigma.view(-1, 1, 1, 1)
    q.bias[:c] = (q.bias[:c] - mu) / sigma
    q.bias[c:] -= 2 * torch.log(sigma)  # logvar of (z - mu) / sigma
    pq = vae.post_quant_conv
    pq.bias += pq.weight[:, :, 0, 0] @ mu
    pq.weight *= sigma.view(1, -1, 1, 1)
    return {"mean": mu.tolist(), "std": sigma.tolist()}


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent mean and std of every image, so U-Net training samples latents without the encoder."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        d = vae.encode(images[i : i + batch]).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def build_vae_stage(workdir: pathlib.Path, steps: int, seed: int, n_images: int = 12000) -> None:
    """Tokenizer + trained, standardised VAE, saved under `workdir` for the U-Net stage."""
    if not (workdir / "tokenizer" / "vocab.json").exists():
        log("tokenizer: fetching the CLIP BPE file from the open_clip_torch wheel")
        write_clip_tokenizer(fetch_clip_bpe(workdir / "wheel"), workdir / "tokenizer")
    vae, data = train_vae(n_images, steps, seed)
    stats = fold_latent_stats(vae, data[:4000])
    check = data[-512:]
    z = vae.encode(check).latent_dist.mean
    with torch.no_grad():
        rec = vae.decode(z).sample
    psnr = 10 * math.log10(4.0 / F.mse_loss(rec, check).item())
    log(
        f"VAE folded stats {stats}; latents now mean {z.mean():.3f} std {z.std():.3f}; held psnr {psnr:.1f} dB"
    )
    vae.save_pretrained(workdir / "vae")
