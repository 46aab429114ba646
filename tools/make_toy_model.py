#!/usr/bin/env python
"""Train the toy base model from scratch on the toy world and write it as a diffusers folder.

The committed finetune/toy/base/ was built with (about 65 min on a shared 2-core CPU):

    python tools/make_toy_model.py --stage vae                                   # tokenizer + VAE
    python tools/make_toy_model.py --stage unet                                  # U-Net, 1st cosine cycle
    python tools/make_toy_model.py --stage unet --resume --seed 1 --unet-steps 2500 --unet-lr 5e-4
    python tools/make_toy_model.py --stage unet --resume --seed 2 --unet-steps 1800 --unet-lr 4e-4
    python tools/make_toy_model.py --eval-only                                   # numbers + README grid

The FLUX-shaped base finetune/toy/base_flux/ (FluxPipeline layout; reuses the SD toy's CLIP, tokenizer
and VAE, so build the SD toy first) is built, evaluated and written in one command, which resumes
from its last checkpoint in --workdir if interrupted:

    python tools/make_toy_model.py --flux
    python tools/make_toy_model.py --flux --eval-only

The few-step student finetune/toy/base_flux_turbo/ (`toy-flux-turbo`: 4 Euler steps, no CFG) is distilled from
the committed FLUX toy base in one command, resumable the same way (finetune/toy/build_flux_turbo.py):

    python tools/make_toy_model.py --flux-turbo           # 128 teacher trajectories, 60 student steps
    python tools/make_toy_model.py --flux-turbo-adapter   # its de-distillation training adapter: 40 steps

(the committed student and adapter: 2.0 + 0.6 CPU minutes, one thread. A larger student, --turbo-trajectories
1536 --turbo-steps 300, took 16.1 CPU minutes and follows prompts a little better at 4 steps: docs/toy.md.)

The Wan-shaped toy video base finetune/toy/base_video/ (WanPipeline layout: its own causal video VAE, a
small UMT5 and a WanTransformer3DModel, trained on finetune/toy/video_world.py clips) likewise, resuming
each stage from --workdir:

    python tools/make_toy_model.py --video --workdir /tmp/toy_video_build
    python tools/make_toy_model.py --video --eval-only

Every U-Net stage ends with the evaluation. The model folder is replaced atomically (written to a
temp folder, then renamed). The tokenizer comes from the real CLIP BPE file inside the open_clip_torch
wheel (pip download, build time only). Same seeds, same machine, same model.
"""

from __future__ import annotations

import os
import sys

# A script in tools/ named like a stdlib module (inspect.py) would shadow it: keep tools/ off the path,
# and put the repository root on it instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import pathlib  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv=None) -> argparse.Namespace:
    from finetune.toy import toy_base_path

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=["vae", "unet", "all"], default="all", help="which part to (re)train")
    p.add_argument("--eval-only", action="store_true", help="only evaluate the model in --out (no training)")
    p.add_argument("--flux", action="store_true", help="build / evaluate the FLUX-shaped toy base instead")
    p.add_argument("--flux-turbo", action="store_true",
                   help="distil the FLUX toy base into its 4-step student (toy-flux-turbo) instead")
    p.add_argument("--turbo-trajectories", type=int, default=128, help="teacher trajectories to distil from")
    p.add_argument("--turbo-steps", type=int, default=60, help="student steps (batch 16 trajectories x 4 windows)")
    p.add_argument("--flux-turbo-adapter", action="store_true",
                   help="train the student's de-distillation training adapter (after --flux-turbo)")
    p.add_argument("--adapter-steps", type=int, default=40, help="training-adapter steps at batch 32")
    p.add_argument("--adapter-images", type=int, default=512, help="world images the training adapter learns on")
    p.add_argument("--video", action="store_true", help="build / evaluate the Wan-shaped toy video base instead")
    p.add_argument("--video-vae-steps", type=int, default=1500, help="video VAE steps (2 whole clips + 8 single frames each)")
    p.add_argument("--video-steps", type=int, default=6000, help="video transformer steps at batch 16")
    p.add_argument(
        "--out",
        type=pathlib.Path,
        default=None,
        help=f"model folder to write / evaluate (default {toy_base_path()}, with --flux its base_flux/ sibling)",
    )
    p.add_argument(
        "--workdir",
        type=pathlib.Path,
        default=pathlib.Path("/tmp/toy_build"),
        help="where the VAE and the tokenizer are kept between stages",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=1500, help="VAE steps at batch 16")
    p.add_argument("--unet-steps", type=int, default=2600, help="U-Net steps at batch 32")
    p.add_argument("--unet-lr", type=float, default=8e-4, help="peak U-Net learning rate (cosine decay)")
    p.add_argument("--flux-steps", type=int, default=10000, help="FLUX transformer steps at batch 32")
    p.add_argument("--flux-lr", type=float, default=1e-3, help="peak FLUX transformer learning rate (cosine)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="start the U-Net from the model in --out (a warm restart) instead of from scratch",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: on a shared 2-core machine 2 threads oversubscribe and run slower)",
    )
    p.add_argument(
        "--grid",
        type=pathlib.Path,
        default=None,
        help="sample grid written by the evaluation (default docs/images/toy_base_grid.png, "
        "with --flux docs/images/toy_flux_base_grid.png)",
    )
    args = p.parse_args(argv)
    from finetune.toy import toy_flux_base_path, toy_path

    if args.out is None:
        args.out = toy_path("toy-flux-turbo") if args.flux_turbo else toy_path("toy-video") if args.video else \
            toy_flux_base_path() if args.flux else toy_base_path()
    if args.grid is None:
        name = "toy_video_base" if args.video else "toy_flux_base" if args.flux else "toy_base"
        args.grid = pathlib.Path(f"docs/images/{name}_grid.png")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from finetune.toy import build, build_unet, evaluate

    if args.flux_turbo_adapter:
        from finetune.toy import build_flux_adapter

        build_flux_adapter.build_flux_adapter(args.workdir, steps=args.adapter_steps, n_images=args.adapter_images,
                                              seed=args.seed)
        return 0
    if args.flux_turbo:
        from finetune.toy import build_flux_turbo

        build_flux_turbo.build_flux_turbo(args.workdir, args.out, trajectories=args.turbo_trajectories,
                                          steps=args.turbo_steps, seed=args.seed)
        return 0
    if args.video:
        return _video(args)
    if args.eval_only:
        evaluate.report(args.out, grid_path=args.grid, grid_seeds=4 if args.flux else 6)
        return 0
    if args.flux:
        from finetune.toy import build_flux_train

        build_flux_train.build_flux_stage(
            args.workdir, args.out, steps=args.flux_steps, seed=args.seed, lr=args.flux_lr
        )
        evaluate.report(args.out, grid_path=args.grid, grid_seeds=4)
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.stage in ("vae", "all"):
        build.build_vae_stage(args.workdir, steps=args.vae_steps, seed=args.seed)
    if args.stage in ("unet", "all"):
        build_unet.build_unet_stage(
            args.workdir, args.out, steps=args.unet_steps, seed=args.seed, lr=args.unet_lr, resume=args.resume
        )
        evaluate.report(args.out, grid_path=args.grid)
    return 0


def _video(args) -> int:
    from finetune.toy import build_video_base, video_evaluate

    if not args.eval_only:
        build_video_base.build_video_base(args.workdir, args.out, args.video_vae_steps, args.video_steps, args.seed)
    video_evaluate.report(args.out, grid_path=args.grid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
