"""Real architectures from their published configs, without weights.

finetune/models/configs/<name>/ holds, for each reference base, the published `model_index.json` and each
component's `config.json` (a diffusers folder with no weights and no tokenizer files, a few KB): SD 1.5, SDXL,
SD 3.5 Medium / Large, FLUX.1 [dev] / [schnell], Qwen-Image, Z-Image-Turbo, FLUX.2 [klein] 4B / 9B, FLUX.2 [dev], Chroma1-HD
(its transformer config is diffusers' ChromaTransformer2DModel defaults, which are Chroma's; T5-XXL, the FLUX.1
VAE and FLUX.1 [dev]'s scheduler, which Chroma reuses), Lumina-Image 2.0 (diffusers' Lumina2Transformer2DModel
defaults with Gemma-2-2B's width as the caption width, google/gemma-2-2b's config, the FLUX.1 VAE), Sana 1600M
1024 px (the values diffusers' scripts/convert_sana_to_diffusers.py and convert_dcae_to_diffusers.py write; Gemma-2-2B-it
has Gemma-2-2B's config), HunyuanImage 2.1 (the transformer and VAE values diffusers'
scripts/convert_hunyuan_image_to_diffusers.py writes; Qwen2.5-VL-7B as Qwen-Image's; byT5-small's encoder for the glyphs;
the scheduler's static shift 5.0 is sd-scripts' HunyuanImage default, the published scheduler config not being on this
machine; the guiders, which hold no weights, are left out), Wan 2.1 T2V
1.3B / 14B, Wan 2.2 T2V A14B (two experts) and TI2V 5B (the values diffusers' scripts/convert_wan_to_diffusers.py
writes: UniPC's flow_shift 3.0, 5.0 for TI2V; boundary_ratio 0.875; the 48-channel VAE's latents_mean/std). They are
built on the meta device by `finetune estimate` when a hub base is not in the local cache, and by the tests at
real shapes (tests/test_real_shapes.py); the benchmarks build some with random weights (timing and memory need
the shapes, not trained weights, and nothing can be downloaded).

The tokenizer is the CLIP BPE tokenizer shipped with the toy base (the same vocabulary SD uses); the T5, Qwen,
Mistral and Gemma tokenizers are small stand-ins built offline (`stand_in_tokenizer`; Wan's UMT5 tokenizer is a
T5TokenizerFast too): what matters at real shapes is how many tokens a caption becomes, not the vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

CONFIGS = Path(__file__).with_name("configs")

#: hub ids whose published configs ship in finetune/models/configs/<name>/
REFERENCE_IDS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15", "runwayml/stable-diffusion-v1-5": "sd15",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "stabilityai/stable-diffusion-3.5-medium": "sd35-medium", "stabilityai/stable-diffusion-3.5-large": "sd35-large",
    "black-forest-labs/FLUX.1-dev": "flux1-dev", "black-forest-labs/FLUX.1-schnell": "flux1-schnell",
    "Qwen/Qwen-Image": "qwen-image", "Tongyi-MAI/Z-Image-Turbo": "z-image-turbo",
    "black-forest-labs/FLUX.2-klein-4B": "flux2-klein-4b", "black-forest-labs/FLUX.2-klein-9B": "flux2-klein-9b",
    "lodestones/Chroma1-HD": "chroma1-hd", "lodestones/Chroma1-Base": "chroma1-hd",
    "black-forest-labs/FLUX.2-dev": "flux2-dev", "Alpha-VLLM/Lumina-Image-2.0": "lumina-image-2",
    "Efficient-Large-Model/Sana_1600M_1024px_diffusers": "sana-1600m-1024px",
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": "wan2.1-1.3b", "Wan-AI/Wan2.1-T2V-14B-Diffusers": "wan2.1-14b",
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers": "wan2.2-a14b", "Wan-AI/Wan2.2-TI2V-5B-Diffusers": "wan2.2-5b",
    "hunyuanvideo-community/HunyuanImage-2.1-Diffusers": "hunyuanimage-2.1",
}


def reference_folder(name: str) -> Path:
    """The config-only diffusers folder of a reference base ('sd15', 'flux1-dev', ...)."""
    folder = CONFIGS / name
    if not (folder / "model_index.json").is_file():
        known = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir())
        raise ValueError(f"no reference config {name!r}; known: {', '.join(known)}")
    return folder


def reference_config(name: str, component: str) -> dict:
    """One component's published config as constructor arguments (bookkeeping keys left out)."""
    folder = reference_folder(name) / component
    path = folder / ("scheduler_config.json" if component == "scheduler" else "config.json")
    skip = {"architectures", "model_type", "torch_dtype"}
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_") and k not in skip}


def stand_in_tokenizer(cls_name: str):
    """A tokenizer of the kind `cls_name` names, for a folder that ships none: CLIP's own BPE (the toy's), or a
    small T5 / Qwen / Mistral tokenizer built offline (Qwen's: its chat template, and Qwen-Image's 34-token template
    head, finetune/models/tiny.py)."""
    import tempfile

    from finetune.models.tiny import clip_tokenizer, mistral_tokenizer, qwen_tokenizer, t5_tokenizer

    if cls_name.startswith("CLIP"):
        return clip_tokenizer()
    if cls_name.startswith("Pixtral"):  # FLUX.2 [dev]'s Mistral processor: its tokenizer and chat template
        with tempfile.TemporaryDirectory() as tmp:
            return mistral_tokenizer(qwen_tokenizer(Path(tmp) / "tokenizer"))
    if cls_name.startswith("ByT5"):  # bytes: nothing to build (HunyuanImage's glyph tokenizer)
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer()
    if cls_name.startswith("Gemma"):  # Lumina 2's (finetune/models/tiny_llm.py)
        from finetune.models.tiny_llm import gemma_tokenizer

        with tempfile.TemporaryDirectory() as tmp:
            return gemma_tokenizer(Path(tmp) / "tokenizer")
    for prefix, build in (("T5", t5_tokenizer), ("Qwen2", qwen_tokenizer)):
        if cls_name.startswith(prefix):
            with tempfile.TemporaryDirectory() as tmp:
                return build(Path(tmp) / "tokenizer")
    raise ValueError(f"no stand-in tokenizer for {cls_name}")


SD15_UNET = reference_config("sd15", "unet")
SD_VAE = reference_config("sd15", "vae")
CLIP_L = reference_config("sd15", "text_encoder")
SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1)

# SD 2.1 (768 px, v-prediction): OpenCLIP-H text encoder, per-block head dims, linear projections
SD21_UNET = SD15_UNET | dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                             use_linear_projection=True, upcast_attention=True)
OPENCLIP_H = dict(
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
)

SDXL_UNET = reference_config("sdxl", "unet")
SDXL_VAE = reference_config("sdxl", "vae")
OPENCLIP_BIGG = reference_config("sdxl", "text_encoder_2")
SDXL_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                      steps_offset=1, timestep_spacing="leading")


# SD 3.5 Medium; T5-XXL (4.7B) is left out of the random base (the benchmark caches text embeddings, so it
# never reaches the GPU; SD3 takes zeros in its place)
SD35M_TRANSFORMER = reference_config("sd35-medium", "transformer")
SD3_VAE = reference_config("sd35-medium", "vae")
SD3_SCHEDULER = reference_config("sd35-medium", "scheduler")


#: benchmark name -> a published config folder built with random weights in bf16 (`build_random_folder`)
FROM_CONFIGS = {"flux-dev": "flux1-dev", "wan-1.3b": "wan2.1-1.3b"}


def build_reference_base(model: str, path: Path) -> Path:
    """Write (once) a diffusers folder of `model` ('sd15', 'sd21', 'sdxl', 'sd35m', 'flux-dev', 'wan-1.3b') with random
    weights; return its path."""
    if (path / "model_index.json").is_file():
        return path
    if model in FROM_CONFIGS:
        return build_random_folder(FROM_CONFIGS[model], path)
    builders = {"sd15": _sd15, "sd21": _sd21, "sdxl": _sdxl, "sd35m": _sd35m}
    if model not in builders:
        raise ValueError(f"no reference config for {model!r}; known: {sorted([*builders, *FROM_CONFIGS])}")
    pipe = builders[model]()
    tmp = path.with_name(path.name + ".tmp")
    pipe.save_pretrained(tmp)
    tmp.rename(path)
    return path


def _sd15():
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from finetune.toy import toy_base_path

    torch.manual_seed(0)
    return StableDiffusionPipeline(
        unet=UNet2DConditionModel(**SD15_UNET), vae=AutoencoderKL(**SD_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L)),
        tokenizer=CLIPTokenizer.from_pretrained(toy_base_path() / "tokenizer"),
        scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def _sd21():
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from finetune.toy import toy_base_path

    torch.manual_seed(0)
    return StableDiffusionPipeline(
        unet=UNet2DConditionModel(**SD21_UNET), vae=AutoencoderKL(**(SD_VAE | dict(sample_size=768))),
        text_encoder=CLIPTextModel(CLIPTextConfig(**OPENCLIP_H)),
        tokenizer=CLIPTokenizer.from_pretrained(toy_base_path() / "tokenizer", pad_token="!"),
        scheduler=DDIMScheduler(**SCHEDULER, prediction_type="v_prediction"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )


def sdxl_modules(device: str = "cpu") -> dict:
    """SDXL base's U-Net, VAE and both text encoders with random weights (`device="meta"`: shapes only)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device(device):
        return {
            "unet": UNet2DConditionModel(**SDXL_UNET), "vae": AutoencoderKL(**SDXL_VAE),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG)),
        }


def _sdxl():
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    from finetune.toy import toy_base_path

    torch.manual_seed(0)
    tokenizer = toy_base_path() / "tokenizer"
    return StableDiffusionXLPipeline(
        **sdxl_modules(), tokenizer=CLIPTokenizer.from_pretrained(tokenizer),
        tokenizer_2=CLIPTokenizer.from_pretrained(tokenizer, pad_token="!"),
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER), force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


def _sd35m():
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from finetune.toy import toy_base_path

    torch.manual_seed(0)
    tokenizer = toy_base_path() / "tokenizer"
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**SD35M_TRANSFORMER), vae=AutoencoderKL(**SD3_VAE),
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG)),
        text_encoder_3=None, tokenizer=CLIPTokenizer.from_pretrained(tokenizer),
        tokenizer_2=CLIPTokenizer.from_pretrained(tokenizer, pad_token="!"), tokenizer_3=None,
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
    )


def build_random_folder(name: str | Path, path: Path, device: str | None = None, dtype: str = "bfloat16") -> Path:
    """A reference config folder (`name`, or any diffusers folder's configs) as a loadable diffusers folder:
    every model built at its published
    shape with random weights, made directly in `dtype` on `device` (the GPU when there is one: a 12B FLUX
    transformer is built in seconds there, minutes on a CPU), stand-in tokenizers, the published scheduler.
    `device="meta"` builds and writes nothing (tests check the shapes)."""
    import shutil

    import torch

    folder = name if isinstance(name, Path) else reference_folder(name)
    index = json.loads((folder / "model_index.json").read_text())
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        for component, (_, cls_name) in ((k, v) for k, v in index.items() if isinstance(v, list) and v[1]):
            if "Tokenizer" in cls_name:
                part = stand_in_tokenizer(cls_name)
            elif "Scheduler" in cls_name:
                import diffusers

                cls = getattr(diffusers, cls_name)
                part = cls.from_config(cls.load_config(folder / component))
            else:
                part = meta_module(folder / component, cls_name).to_empty(device=device)
                _fill(part)
                if hasattr(part, "tie_weights"):  # to_empty gives tied weights (T5's embeddings) storages of their own
                    part.tie_weights()
            if device != "meta":
                part.save_pretrained(tmp / component)
    finally:
        torch.set_default_dtype(previous)
    if device == "meta":
        return path
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    tmp.rename(path)
    return path


def _fill(module) -> None:
    """Random weights of a sensible scale (a normal of std 0.02, norms' scales 1, biases 0): timing and memory
    need values that stay finite through the layers, not trained ones."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0 if "norm" in name or name.endswith("scale") else 0.0)
            else:
                p.normal_(0.0, 0.02)
        for b in module.buffers():
            if b.is_floating_point():
                b.zero_()


def meta_module(folder: Path, cls_name: str):  # -> torch.nn.Module (torch imported only inside)
    """The diffusers or transformers model `cls_name` of a config folder, built on the meta device."""
    import diffusers
    import torch
    import transformers

    if hasattr(diffusers, cls_name) and hasattr(getattr(diffusers, cls_name), "load_config"):
        cls = getattr(diffusers, cls_name)
        with torch.device("meta"):
            return cls.from_config(cls.load_config(folder))
    cls = getattr(transformers, cls_name)
    config = cls.config_class.from_pretrained(folder)
    with torch.device("meta"):
        return cls(config)
