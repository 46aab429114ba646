"""The toy video base's VAE stage (finetune/toy/build_video_vae.py): the colour probe reads the right frames,
the stage resumes and ships a stock AutoencoderKLWan, and (slow) the probe is what keeps colour in the latents
of this tiny Wan VAE."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finetune.toy import build_video, build_video_vae, video_world


def test_colour_targets_follow_the_causal_latent_frames():
    vae = build_video.make_vae(0).eval()
    colours = torch.rand(video_world.FRAMES, 3) * 2 - 1  # one flat colour a frame
    x = colours.T[None, :, :, None, None].expand(1, 3, video_world.FRAMES, 64, 64).contiguous()
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
    target = build_video_vae.colour_targets(x, z)
    assert z.shape == (1, 8, 3, 16, 16) and target.shape == (1, 3, 3, 16, 16)
    # latent frame 0 is frame 0 alone; latent frame k ends on frame 4k
    for k, frame in enumerate((0, 4, 8)):
        assert torch.allclose(target[0, :, k], colours[frame][:, None, None].expand(3, 16, 16))


def test_the_stage_resumes_and_ships_a_stock_wan_vae(tmp_path):
    from diffusers import AutoencoderKLWan

    torch.set_num_threads(1)
    vae, _ = build_video_vae.vae_stage(tmp_path, 2, 0, n_clips=6)
    state = torch.load(tmp_path / build_video_vae.CHECKPOINT, weights_only=True)
    assert {"probe.weight", "probe.bias"} <= set(state["model"])  # the probe trains and resumes with the VAE
    again, _ = build_video_vae.vae_stage(tmp_path, 2, 0, n_clips=6)  # resumes at 2/2: the same EMA VAE
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), again.state_dict().values(), strict=True))
    # the probe is not shipped: the VAE saves and loads as a plain AutoencoderKLWan with measured latent stats
    assert type(vae) is AutoencoderKLWan and set(vae.state_dict()) == set(build_video.make_vae().state_dict())
    vae.save_pretrained(tmp_path / "vae")
    loaded = AutoencoderKLWan.from_pretrained(tmp_path / "vae")
    assert loaded.config.latents_mean == vae.config.latents_mean != [0.0] * build_video.LATENT_CHANNELS


def _latent_colour_accuracy(vae, n: int = 200) -> float:
    """Nearest-centroid colour probe on the latent pixels under the shape (first frames of unseen clips)."""
    from finetune.toy.build_video_train import clips_uint8, to_unit

    clips = video_world.world_clips(n, seed=7)
    x = to_unit(clips_uint8(clips)[:, :, :1])
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()[:, :, 0]
    under = torch.nn.functional.avg_pool2d(build_video_vae.shape_weight(x[:, :, 0]) - 1, 4)[:, 0] > 4.5
    feats = torch.stack([z[i][:, under[i]].mean(1) for i in range(n)]).numpy()
    names = np.array([c.split()[1] for _, c in clips])
    keep = ~np.isnan(feats[:, 0])
    feats, names, half = feats[keep], names[keep], keep.sum() // 2
    sd = feats[:half].std(0) + 1e-6
    cents = {c: feats[:half][names[:half] == c].mean(0) for c in set(names[:half])}
    pred = [min(cents, key=lambda c: (((f - cents[c]) / sd) ** 2).sum()) for f in feats[half:]]
    return float(np.mean(np.array(pred) == names[half:]))


@pytest.mark.slow
def test_the_colour_probe_keeps_colour_in_the_latents():
    """Trained with the build's loss on single frames for 100 steps, the latent tells the five colours apart
    (without the probe term the same run stays near 0.4: the tiny Wan VAE keeps place, not hue)."""
    from finetune.toy.build_video_train import clips_uint8, to_unit

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_video_vae.ColourProbe(build_video.make_vae(0))
    frames = clips_uint8(video_world.world_clips(400, seed=100))[:, :, 0]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        x = to_unit(frames[torch.randint(len(frames), (16,), generator=gen)]).unsqueeze(2)
        loss = build_video_vae.vae_loss(model, x, gen, chroma=0.0)  # the probe-only phase of the build
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    assert _latent_colour_accuracy(model.vae.eval()) >= 0.8
