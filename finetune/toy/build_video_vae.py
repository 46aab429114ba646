"""The toy video base's VAE stage: a tiny `AutoencoderKLWan` trained from scratch on toy clips and frames.

Why there is a colour probe. Trained on reconstruction alone, this tiny Wan VAE (16 / 32 channels, Wan's
per-pixel RMS channel norm) drew every shape as a colourless blob: a nearest-centroid probe on its latents
told the five colours apart in only ~40% of frames (the shape's place and brightness were there, the hue was
not), so the decoder had nothing to paint with and learned the mean colour. A 2-D AutoencoderKL (GroupNorm)
of the same size did not do this as badly, but the base must stay a stock Wan VAE. The fix is in the loss:
a 1x1 convolution (`ColourProbe.probe`, trained with the VAE, thrown away afterwards) must read each latent
pixel's 4x4 average colour back from the latent, so the encoder keeps colour from the first steps; the
decoder then learns to use it. Single frames of other clips are mixed into every step (the first-frame path
of the causal VAE), so one step sees ten shapes' colours instead of two. docs/toy.md has the numbers.
"""

from __future__ import annotations

import pathlib

import torch
import torch.nn.functional as F

from finetune.toy import build_video, video_world
from finetune.toy.build import log

VAE_CLIPS, VAE_FRAMES = 2, 8  # per step: whole 9-frame clips + single frames from other clips
VAE_LR = 1e-3
PROBE_WEIGHT = 1.0
# extra weight on the colour-difference (YUV U, V) part of the pixel error, from CHROMA_FROM x steps on: switched
# on from the start (before the latents carry colour) it drove the decoder into a flat output (MSE 0.55, stuck)
CHROMA_WEIGHT, CHROMA_FROM = 3.0, 0.2
# RGB -> the U and V rows of YUV (BT.601): the part of an error that changes hue, not brightness
_CHROMA = torch.tensor([[-0.169, -0.331, 0.5], [0.5, -0.419, -0.081]])
CHECKPOINT = "video_vae_colour.pt"  # not video_vae.pt: older workdirs hold a probe-less VAE


class ColourProbe(torch.nn.Module):
    """The VAE under training plus the linear colour read-out its latents must support."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.probe = torch.nn.Conv3d(vae.config.z_dim, 3, 1)


def shape_weight(x: torch.Tensor) -> torch.Tensor:
    """10 on the shape's (saturated) pixels, 1 on the plain background (~95% of a frame): plain MSE first
    settles on drawing the background alone."""
    return 1 + 9 * ((x.amax(dim=1) - x.amin(dim=1)) > 0.25).float().unsqueeze(1)


def colour_targets(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The colours each latent pixel must carry: the last frame of its causal chunk (frame 0, then frames
    4, 8, ...), averaged over the pixels it covers. x [B, 3, F, H, W], z [B, C, T, h, w] -> [B, 3, T, h, w]."""
    frames = x[:, :, :: build_video.VAE_CONFIG["scale_factor_temporal"]]
    s = x.shape[-1] // z.shape[-1]
    return F.avg_pool3d(frames, (1, s, s))


def vae_loss(model: ColourProbe, x: torch.Tensor, gen: torch.Generator, chroma: float = CHROMA_WEIGHT) -> torch.Tensor:
    """Weighted reconstruction (+ chroma) of the posterior's mode with a little latent noise (so the decoder
    tolerates a transformer's small errors), the colour probe, and a tiny pull of the latents to 0."""
    z = model.vae.encode(x).latent_dist.mode()
    rec = model.vae.decode(z + 0.05 * z.detach().std() * torch.randn(z.shape, generator=gen)).sample
    err = rec - x
    uv = torch.einsum("ij,bj...->bi...", _CHROMA, err)
    per_pixel = err.pow(2).mean(1, keepdim=True) + chroma * uv.pow(2).sum(1, keepdim=True)
    recon = (shape_weight(x) * per_pixel).mean()
    target = colour_targets(x, z)
    probe = (shape_weight(target) * (model.probe(z) - target) ** 2).mean()
    return recon + PROBE_WEIGHT * probe + 1e-4 * z.pow(2).mean()


def vae_batch(data: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`VAE_CLIPS` whole clips and `VAE_FRAMES` single frames (random frame of other random clips), in [-1, 1]."""
    from finetune.toy.build_video_train import to_unit

    idx = torch.randint(len(data), (VAE_CLIPS + VAE_FRAMES,), generator=gen)
    t = torch.randint(video_world.FRAMES, (VAE_FRAMES,), generator=gen)
    frames = data[idx[VAE_CLIPS:], :, t]  # [VAE_FRAMES, 3, H, W]
    return to_unit(data[idx[:VAE_CLIPS]]), to_unit(frames).unsqueeze(2)


def vae_stage(workdir: pathlib.Path, steps: int, seed: int, n_clips: int = 3000):
    """Train the VAE (resumable from `workdir`); returns the EMA VAE with its latent stats measured."""
    from finetune.toy.build_video_train import Stage, clips_uint8, latent_stats, to_unit

    data = clips_uint8(video_world.world_clips(n_clips, seed=seed + 100))
    stage = Stage(ColourProbe(build_video.make_vae(seed)), steps, VAE_LR, seed, workdir / CHECKPOINT)
    log(f"VAE: {sum(p.numel() for p in stage.model.vae.parameters()) / 1e6:.2f} M params, {len(data)} clips, "
        f"{steps} steps of {VAE_CLIPS} clips x {video_world.FRAMES} frames + {VAE_FRAMES} single frames")

    def loss(gen):
        clips, frames = vae_batch(data, gen)
        chroma = CHROMA_WEIGHT if stage.step >= CHROMA_FROM * steps else 0.0
        return vae_loss(stage.model, clips, gen, chroma) + vae_loss(stage.model, frames, gen, chroma)

    stage.run(loss, "vae", on_save=lambda: vae_check(stage.ema_model().vae))
    vae = stage.ema_model().vae
    mean, std = latent_stats(vae, to_unit(data[:512]))
    vae.register_to_config(latents_mean=mean, latents_std=std)
    return vae, stage.spent


@torch.no_grad()
def vae_check(vae, n: int = 40, seed: int = 7) -> dict:
    """Reconstruct the first frames of `n` unseen clips: pixel MSE (in [-1, 1]) and how many come back in
    their caption's colour by the image scorer. Logged after the VAE stage, before the transformer trains on
    its latents (a VAE that loses colour makes a base that cannot follow colour prompts)."""
    from finetune.toy.build_video_train import clips_uint8, to_unit
    from finetune.toy.score import colour_of

    clips = video_world.world_clips(n, seed=seed + 1000)
    x = to_unit(clips_uint8(clips)[:, :, :1])
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    imgs = ((rec[:, :, 0] + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    right = sum(colour_of(img) == cap.split()[1] for img, (_, cap) in zip(imgs, clips, strict=True))
    out = {"frames": n, "mse": round(float((rec - x).pow(2).mean()), 4), "colour_right": int(right)}
    log(f"VAE check on {n} unseen first frames: MSE {out['mse']}, colour right in {right}/{n}")
    return out
