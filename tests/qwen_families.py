"""Shared cases for the tests of the transformer families conditioned by one large frozen text encoder (Z-Image,
Qwen-Image, FLUX.2 [klein] with Qwen-family encoders; Chroma with T5; FLUX.2 [dev] with Mistral 3; Lumina 2 and
Sana with Gemma 2; Krea 2 with Qwen3-VL; HiDream-I1 with Llama 3.1, T5 and two CLIPs; HunyuanImage 2.1 with
Qwen2.5-VL and byT5; Qwen-Image 2.1 with Qwen3-VL): tiny bases, recipes, a
trainer, and a fixed denoiser call per family for before/after comparisons."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from tests.helpers import draw_images, write_recipe

CAPTIONS = ["a red circle on a white background", "blue", ""]


@dataclass(frozen=True)
class Case:
    family: str
    pipeline: str
    latent: tuple[int, int, int]  # one image's latents at 64 px in the family's layout
    text_width: int | tuple[int, ...]  # per token (Krea 2: stacked encoder layers x width)
    masked: str | None  # the text mask's key, where the family has one
    targets: str  # the preset that reaches every block kind of the tiny model
    tokens: int = 32  # caption tokens (FLUX.2 [dev]'s system message alone is 99 tokens of the tiny tokenizer)
    comfy_targets: tuple[str, ...] = ()  # what the ComfyUI-form run trains, where the form cannot hold `targets`
    extra_text: tuple[tuple[str, tuple[int, ...]], ...] = ()  # more text tensors per caption (HiDream: Llama, pooled)


CASES = {
    "z_image": Case("z_image", "ZImagePipeline", (16, 16, 16), 16, "prompt_mask", "attention_mlp"),
    "qwen_image": Case("qwen_image", "QwenImagePipeline", (16, 16, 16), 32, "prompt_embeds_mask", "attention_mlp"),
    "flux2_klein": Case("flux2_klein", "Flux2KleinPipeline", (16, 8, 8), 48, None, "all_linear"),
    "chroma": Case("chroma", "ChromaPipeline", (16, 16, 16), 32, "prompt_attention_mask", "all_linear"),
    "flux2_dev": Case("flux2_dev", "Flux2Pipeline", (16, 8, 8), 48, None, "all_linear", tokens=128),
    # the system prompt alone is 27 tokens of the tiny Gemma tokenizer
    # ComfyUI's Lumina 2 map cannot place grouped k / v (finetune/models/families/lumina2.py)
    "lumina2": Case("lumina2", "Lumina2Pipeline", (16, 8, 8), 16, "prompt_attention_mask", "attention_mlp", tokens=48,
                    comfy_targets=("attn.to_q", "attn.to_out.0", "feed_forward.linear_1", "feed_forward.linear_2",
                                   "feed_forward.linear_3")),
    # DC-AE: 64 px -> 16x16 latents of 8 channels, patch 1; the caption window is 32 tokens after the instruction
    "sana": Case("sana", "SanaPipeline", (8, 16, 16), 16, "prompt_attention_mask", "attention_mlp"),
    "krea2": Case("krea2", "Krea2Pipeline", (16, 16, 16), (2, 16), "prompt_embeds_mask", "attention_mlp"),
    "hidream": Case("hidream", "HiDreamImagePipeline", (16, 16, 16), 32, None, "attention_mlp",
                    extra_text=(("llama_embeds", (2, 8, 16)), ("pooled_prompt_embeds", (32,)))),
    # the byT5 glyph states (128 tokens, 16 wide) and their mask ride beside Qwen's
    # 16x RGBA VAE: 64 px -> 4x4 latents of 16 channels, one token each; captions keep their own length
    "qwen_image21": Case("qwen_image21", "QwenImage21Pipeline", (16, 4, 4), 16, "prompt_embeds_mask", "attention_mlp"),
    "hunyuanimage": Case("hunyuanimage", "HunyuanImagePipeline", (16, 16, 16), 32, "prompt_embeds_mask",
                         "all_linear_mod", extra_text=(("prompt_embeds_2", (128, 16)), ("prompt_embeds_mask_2", (128,)))),
}


def text_dims(case: Case) -> tuple[int, ...]:
    return case.text_width if isinstance(case.text_width, tuple) else (case.text_width,)


def build(name: str, folder: Path, **kwargs) -> Path:
    from finetune.models.tiny import build_tiny

    return build_tiny(name, folder, **kwargs)


def recipe(tmp_path: Path, base: Path, case: Case, **sections) -> Path:
    """A 3-step LoRA recipe (rank 4, alpha 2: the scale is not 1) on 64 px images with the case's caption tokens."""
    from finetune.recipe import deep_merge

    defaults = {"model": {"max_sequence_length": case.tokens},
                "method": {"name": "lora", "rank": 4, "alpha": 2, "targets": case.targets},
                "train": {"max_steps": 3, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 0, "seed": 5}}
    path = write_recipe(tmp_path, base, draw_images(tmp_path / "images"), **deep_merge(defaults, sections))
    if sections.get("method", {}).get("name") not in (None, "lora"):  # another method: none of LoRA's keys
        data = yaml.safe_load(path.read_text())
        data["method"] = sections["method"]
        path.write_text(yaml.safe_dump(data))
    return path


def trainer(path: Path, *overrides: str):
    from finetune.recipe import load_recipe
    from finetune.train.setup import make_accelerator
    from finetune.train.trainer import Trainer

    r = load_recipe(path, list(overrides))
    return Trainer(r, make_accelerator(r))


def fixed_text(case: Case, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Two captions of 8 tokens, the second with 3 padding tokens where the family masks padding."""
    dims = text_dims(case)
    text = {"prompt_embeds": torch.randn(2, 8, *dims, generator=g)}
    if case.masked:
        mask = torch.ones(2, 8)
        mask[1, 5:] = 0
        text["prompt_embeds"] = text["prompt_embeds"] * mask.view(2, 8, *[1] * len(dims))
        text[case.masked] = mask
    for key, shape in case.extra_text:
        text[key] = torch.randn(2, *shape, generator=g)
    return text


def fixed_output(case: Case, denoiser) -> torch.Tensor:
    """The denoiser's prediction (through the family's own `predict`) on fixed latents, sigmas and text."""
    from finetune.models.families import FAMILIES

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, *case.latent, generator=g)
    text = fixed_text(case, g)
    with torch.no_grad():
        return FAMILIES[case.family].predict(denoiser, latents, torch.tensor([300.0, 800.0]), text, {})


def load_lora(pipe, folder: Path) -> None:
    """The diffusers LoRA file in `folder` into a stock pipeline: its LoRA loader, or, for a pipeline without one
    (HunyuanImagePipeline in diffusers 0.42.1), the transformer's own (PeftAdapterMixin.load_lora_adapter; the file
    named, so that diffusers reads alpha and rank from its header)."""
    if hasattr(pipe, "load_lora_weights"):
        pipe.load_lora_weights(folder)
    else:
        pipe.transformer.load_lora_adapter(str(folder), weight_name="pytorch_lora_weights.safetensors",
                                           prefix="transformer")


def stock(case: Case, folder: Path):
    """The stock pipeline from a folder, with the parts its family loads itself (Qwen-Image 2.1's processor, which
    transformers would load with a video processor that needs torchvision)."""
    from finetune.models.families import FAMILIES

    family = FAMILIES[case.family]
    parts = {n: family.load_component(n, str(folder)) for n in family.extra_parts}
    return pipeline_class(case).from_pretrained(folder, **{n: p for n, p in parts.items() if p is not None})


def pipeline_class(case: Case):
    import diffusers

    return getattr(diffusers, case.pipeline)


def first_step_noise_and_sigmas(t, latents: torch.Tensor, sched, flow: dict, tokens: int | None):
    """(noise, sigmas) of a trainer's first step, drawn as the trainer draws them: its per-sample generators,
    diffusers' density helper (logit-normal by default; uniform where the test's `flow` override is given), the
    scheduler's grid, shifted by FLUX's `calculate_shift` for `tokens` image tokens unless `flow` turns it off or
    `tokens` is None (families on a statically shifted grid)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from tests.helpers import first_step_generators

    noise, u = [], []
    for g in first_step_generators(t.recipe.train.seed, 0, 0, latents.shape[0]):
        noise.append(torch.randn(latents.shape[1:], generator=g))
        u.append(compute_density_for_timestep_sampling("none" if flow else "logit_normal", 1, logit_mean=0.0,
                                                       logit_std=1.0, generator=g))
    sigmas = sched.sigmas[(torch.cat(u) * 1000).long()]
    if not flow and tokens is not None:
        c = sched.config
        mu = calculate_shift(tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
        sigmas = sched.time_shift(mu, 1.0, sigmas)
    return torch.stack(noise), sigmas
