"""The toy video base end to end: the VAE stage (finetune/toy/build_video_vae.py, with its colour probe), the
latent cache, then the transformer stage (finetune/toy/build_video_train.py); every stage resumes from its
work folder. Its own module so the two stages import each other's helpers without a circle."""

from __future__ import annotations

import pathlib

from finetune.toy import build_video, build_video_vae
from finetune.toy.build import log
from finetune.toy.build_video_train import DIT_BATCH, _load, _save, prepare, transformer_stage


def build_video_base(workdir: pathlib.Path, out: pathlib.Path, vae_steps: int, dit_steps: int, seed: int = 0,
                     n_clips: int = 8000) -> float:
    """Build the whole toy video base into `out`; every stage resumes from `workdir` if interrupted."""
    from safetensors.torch import load_file, save_file

    workdir.mkdir(parents=True, exist_ok=True)
    tok = build_video.tokenizer()
    parts = {"tokenizer": tok, "text_encoder": build_video.text_encoder(len(tok), seed)}
    vae_file = workdir / build_video_vae.CHECKPOINT.replace(".pt", "_final.pt")
    if vae_file.exists():
        st = _load(vae_file)
        vae = build_video.make_vae(seed, st["mean"], st["std"])
        vae.load_state_dict(st["model"])
        vae_spent = st["spent"]
    else:
        vae, vae_spent = build_video_vae.vae_stage(workdir, vae_steps, seed)
        _save(vae_file, {"model": vae.state_dict(), "mean": list(vae.config.latents_mean),
                         "std": list(vae.config.latents_std), "spent": vae_spent})
    vae = vae.eval().requires_grad_(False)
    check = build_video_vae.vae_check(vae)
    cache = workdir / f"video_latents_colour_{n_clips}_seed{seed}.safetensors"
    if cache.exists():
        data = load_file(cache)
    else:
        data = prepare(vae, parts, n_clips, seed)
        save_file({k: v.contiguous() for k, v in data.items()}, cache)
    transformer, spent = transformer_stage(workdir, data, dit_steps, seed)
    info = {"vae": {"steps": vae_steps, "clips": build_video_vae.VAE_CLIPS, "frames": build_video_vae.VAE_FRAMES,
                    "lr": build_video_vae.VAE_LR, "colour_probe": build_video_vae.PROBE_WEIGHT,
                    "chroma": build_video_vae.CHROMA_WEIGHT,
                    "chroma_from": build_video_vae.CHROMA_FROM, "config": build_video.VAE_CONFIG,
                    "check": check},
            "transformer": {"steps": dit_steps, "batch": DIT_BATCH, "clips": n_clips, "ema": 0.999,
                            "timesteps": f"logit_normal(0, 1), shift {build_video.FLOW_SHIFT}",
                            "caption_dropout": 0.1},
            "build_minutes": round(vae_spent["minutes"] + spent["minutes"], 1),
            "build_cpu_minutes": round(vae_spent["cpu_minutes"] + spent["cpu_minutes"], 1),
            "sampler": dict(build_video.SAMPLER, max_sequence_length=build_video.MAX_SEQUENCE_LENGTH)}
    size = build_video.save_video_pipeline(out, {**parts, "vae": vae, "transformer": transformer}, info)
    log(f"wrote {out} ({size:.1f} MB); build {info['build_minutes']} min, {info['build_cpu_minutes']} CPU min")
    return size
