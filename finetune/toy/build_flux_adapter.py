"""A de-distillation training adapter for the toy's few-step student (`toy-flux-turbo`).

A LoRA on the student, trained so that student + LoRA predicts what the undistilled base predicts on the inputs a
LoRA trains on: noisy world latents at the flow objective's noise levels (logit-normal, shifted by resolution),
under world captions and the empty one. That is what the FLUX.1 [schnell] and Z-Image-Turbo training adapters are
for (ai-toolkit's `assistant_lora_path`): applied while a LoRA trains on the distilled model
(`model.training_adapter`), it takes the pull back toward an undistilled model, so the trained LoRA keeps only the
subject; removed afterwards, the student samples in its 4 steps again. Here the base is at hand, so its
predictions are the target (the published adapters had to do without the teacher).

    python tools/make_toy_model.py --flux-turbo-adapter    # after --flux-turbo; resumable

Written as a diffusers LoRA file (`pytorch_lora_weights.safetensors`, what `model.training_adapter` and
`load_lora_weights` read) into the student's folder, `training_adapter/`.
"""

from __future__ import annotations

import pathlib
import time

import torch
import torch.nn.functional as F

from finetune.toy import build_flux, toy_flux_base_path, toy_path
from finetune.toy.build import log

RANK = 16
FOLDER = "training_adapter"  # inside the student's folder


def linear_names(model) -> list[str]:
    """Every Linear of the transformer: the student moved all of them away from the base."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def load_pair() -> tuple[dict, torch.nn.Module]:
    """The base's components (its transformer the target) and the student's transformer, fp32."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    base = dict(FluxPipeline.from_pretrained(toy_flux_base_path(), dtype=torch.float32).components)
    student = FluxTransformer2DModel.from_pretrained(toy_path("toy-flux-turbo") / "transformer", dtype=torch.float32)
    return base, student.eval().requires_grad_(False)


def adapter_model(student, rank: int = RANK):
    """The student with a fresh peft LoRA (B = 0: starts as the student) on every Linear."""
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=linear_names(student), init_lora_weights="gaussian")
    model = inject_adapter_in_model(cfg, student)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return model, cfg


def dedistill_loss(model, teacher, objective, data: dict, batch: int, uncond: float, gen) -> torch.Tensor:
    """student + LoRA against the base on one batch of noisy world latents (the flow objective's inputs)."""
    from finetune.toy.build_flux_train import _batch

    raw, t5, pooled = _batch(data, batch, uncond, gen)
    b, ch = raw.shape[:2]
    x0 = (raw - objective.shift) * objective.scale
    noise = torch.randn(x0.shape, generator=gen)
    s = objective.sigmas(b, gen)
    xs = objective.pack((1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise, b, ch, objective.hw, objective.hw)
    kw = dict(hidden_states=xs, timestep=s, pooled_projections=pooled, encoder_hidden_states=t5,
              txt_ids=objective.txt_ids, img_ids=objective.img_ids)
    with torch.no_grad():
        target = teacher(**kw).sample
    return F.mse_loss(model(**kw).sample, target)


def save_adapter_file(model, cfg, out: pathlib.Path, info: dict) -> pathlib.Path:
    """The LoRA as a diffusers file (through finetune/export, the one place that writes weights)."""
    import json

    from peft.utils import get_peft_model_state_dict

    from finetune.export.lora import _config_dict, save_diffusers_lora

    tensors = {f"transformer.{k}": v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    meta = {"finetune.base_model": "toy-flux-turbo", "finetune.family": "flux",
            "finetune.training_adapter": json.dumps(info)}
    out.mkdir(parents=True, exist_ok=True)
    return save_diffusers_lora(tensors, {"transformer": _config_dict(cfg)}, out, meta, "lora")


def build_flux_adapter(workdir: pathlib.Path, steps: int = 40, lr: float = 1e-3, batch: int = 32,
                       n_images: int = 512, seed: int = 0) -> pathlib.Path:
    """Train the toy's de-distillation adapter and write it into the student's folder; resumes from `workdir`."""
    from safetensors.torch import load_file, save_file

    from finetune.toy.build_flux_train import FlowObjective, Trainer, prepare_data

    workdir.mkdir(parents=True, exist_ok=True)
    base, student = load_pair()
    teacher = base["transformer"].eval().requires_grad_(False)
    cache = workdir / f"flux_adapter_latents_{n_images}_seed{seed}.safetensors"
    if cache.exists():
        data = load_file(cache)
    else:
        text = {k: base[k] for k in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}
        data = prepare_data(base["vae"], text, n_images, seed=seed + 40)
        save_file({k: v.contiguous() for k, v in data.items()}, cache)
    model, cfg = adapter_model(student)
    trainer = Trainer(steps, seed, lr, workdir / f"flux_adapter_seed{seed}.pt", batch=batch, model=model, warm=20,
                      ema_decay=0.99, steps_flag="--adapter-steps")
    objective = FlowObjective(base["vae"].config, build_flux.make_scheduler(), data["latents"].shape[-1])
    t0, first = time.time(), trainer.step
    while trainer.step < steps:
        trainer.update(dedistill_loss(trainer.model, teacher, objective, data, batch, 0.3, trainer.gen))
        s = trainer.step
        if s % 50 == 0 or s == steps:
            rate = (time.time() - t0) / max(s - first, 1)
            log(f"adapter step {s}/{steps} loss {trainer.running:.5f} {rate:.2f} s/step, ETA {(steps - s) * rate / 60:.0f} min")
        if s % 100 == 0 or s == steps:
            trainer.save()
    info = {"target": "toy-flux (the undistilled base's predictions)", "rank": RANK, "steps": steps, "batch": batch,
            "lr": lr, "images": n_images, "empty_captions": 0.3, "cpu_minutes": round(trainer.tick()["cpu_minutes"], 1)}
    path = save_adapter_file(trainer.ema_model(), cfg, toy_path("toy-flux-turbo") / FOLDER, info)
    log(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB); {info['cpu_minutes']} CPU min")
    return path
