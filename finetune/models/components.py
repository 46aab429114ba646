"""Load the base model's components from the recipe, and freeze them.

`model.base` may be a hub id, a local diffusers folder, a single-file checkpoint (.safetensors; pickle
formats only with `model.allow_pickle`) or `toy`. Everything is loaded frozen: by default in fp32; the
trainer passes a `LoadPrecision` so that frozen parts load straight in the compute dtype (a 12B FLUX
transformer is 24 GB of host RAM in bf16, 48 GB in fp32) and only what a method trains in place loads in
fp32. `model.quantize` / `model.quantize_text_encoders` then convert the frozen linear layers
(finetune/models/quantize.py). The trainer casts what is left after the method has chosen what trains
(`cast_frozen`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune.errors import ModelError
from finetune.models.detect import family_of_checkpoint
from finetune.models.family import FAMILIES, Family, family_from_configs
from finetune.sections import ModelSection

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SINGLE_FILE_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


@dataclass
class Components:
    """The frozen base and what the trainer needs to know about it.

    `denoiser` is the family's U-Net or transformer (named `family.denoiser_name` in the pipeline and in
    exports); `text_encoders` / `tokenizers` hold the encoders the base was loaded with, in the family's
    order, without those the recipe dropped (`text_encoder_names` says which they are)."""

    denoiser: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    scheduler: Any  # the training scheduler: DDPM from the base's config, or the base's flow-matching one
    family: Family
    base: str  # the recipe's model.base
    source: str  # where it was loaded from (resolved folder, file or hub id)
    prediction_type: str  # 'epsilon' / 'v_prediction' (DDPM) or 'flow'
    text_encoder_names: tuple[str, ...] = ()
    max_sequence_length: int | None = None  # T5-style encoders: tokens per caption (None: family default)
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not self.text_encoder_names:
            self.text_encoder_names = tuple(self.family.text_encoder_names[: len(self.text_encoders)])

    @property
    def denoiser_name(self) -> str:
        return self.family.denoiser_name

    @property
    def unet(self):
        """The U-Net families' denoiser under its own name (older code and tests)."""
        return self.denoiser

    @property
    def text_encoder(self):
        return self.text_encoders[0]

    @property
    def tokenizer(self):
        return self.tokenizers[0]

    def encoder(self, name: str):
        """The text encoder the pipeline calls `name`, or None when the recipe dropped it."""
        return dict(zip(self.text_encoder_names, self.text_encoders, strict=True)).get(name)

    def tokenizer_for(self, encoder_name: str):
        names = self.family.text_encoder_names
        toks = dict(zip([n for n in names if n in self.text_encoder_names], self.tokenizers, strict=True))
        return toks.get(encoder_name)

    def named_modules(self) -> dict[str, torch.nn.Module]:
        mods = {self.family.denoiser_name: self.denoiser, "vae": self.vae}
        for name, enc in zip(self.text_encoder_names, self.text_encoders, strict=True):
            mods[name] = enc
        return mods

    def pipeline(self, denoiser=None, text_encoders=None, scheduler=None):
        """A diffusers pipeline over these components (for validation and class-image generation)."""
        import diffusers

        family = self.family
        cls = getattr(diffusers, family.pipeline_class)
        encoders = dict(zip(self.text_encoder_names, text_encoders or self.text_encoders, strict=True))
        parts: dict[str, Any] = {family.denoiser_name: denoiser or self.denoiser, "vae": self.vae,
                                 "scheduler": scheduler or self.scheduler}
        for name, tok_name in zip(family.text_encoder_names, family.tokenizer_names, strict=True):
            parts[name] = encoders.get(name)
            parts[tok_name] = self.tokenizer_for(name) if name in encoders else None
        decode_in_own_dtype(self.vae)
        kept = {k: v for k, v in self.extras.get("pipeline_config", {}).items() if k in family.pipeline_config_keys}
        return cls(**parts, **kept, **family.pipeline_kwargs)


def decode_in_own_dtype(vae) -> None:
    """Make `vae.decode` run outside autocast, in the VAE's own dtype. Validation grids and class images are
    rendered under the trainer's autocast, which would decode an fp32 SDXL VAE in fp16 anyway (overflow:
    NaN latents, black images); diffusers' own upcast only looks at the VAE's dtype, not at autocast."""
    if getattr(vae, "_decodes_in_own_dtype", False):
        return
    decode = vae.decode

    def own_dtype(z, *args, **kwargs):
        with torch.autocast(z.device.type, enabled=False):
            return decode(z.to(vae.dtype), *args, **kwargs)

    vae.decode = own_dtype
    vae._decodes_in_own_dtype = True


def resolve_base(base: str) -> tuple[str, str]:
    """('folder' | 'file' | 'hub', location) for a model.base value."""
    from finetune.toy import toy_path

    if toy_path(base) is not None:
        return "folder", str(toy_path(base))
    path = Path(base).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(
                f"model.base '{base}': folder has no model_index.json; point it at a diffusers model folder "
                "(the one holding unet/, vae/, text_encoder/ ...) or at a single .safetensors file"
            )
        return "folder", str(path)
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        if not path.is_file():
            raise ModelError(f"model.base '{base}': file does not exist; check the path")
        return "file", str(path)
    if base.startswith((".", "/", "~")) or os.sep in base.strip("/").replace("/", "", 1):
        raise ModelError(f"model.base '{base}': no such folder or file; check the path")
    return "hub", base


@dataclass(frozen=True)
class LoadPrecision:
    """The dtypes a base loads in. Frozen weights load straight in `compute`; the VAE in `vae`; the parts
    whose own weights a method trains (`trained`: 'denoiser', 'text_encoders') in fp32, so their fp32
    master weights come from the file, not from a rounded copy."""

    compute: torch.dtype = torch.float32
    vae: torch.dtype = torch.float32
    trained: frozenset[str] = frozenset()

    def by_component(self) -> dict[str, torch.dtype]:
        """`from_pretrained`'s per-component dtypes (any family's component names; 'default' for the rest)."""
        fp32 = torch.float32
        denoiser = fp32 if "denoiser" in self.trained else self.compute
        text = fp32 if "text_encoders" in self.trained else self.compute
        out = {"default": self.compute, "vae": self.vae, "unet": denoiser, "transformer": denoiser}
        out |= {f"text_encoder{s}": text for s in ("", "_2", "_3")}
        return out

    def single(self) -> torch.dtype:
        """One dtype for a single-file load (diffusers takes only one there): the compute dtype when every
        part may load in it, else fp32 (cast down afterwards)."""
        return self.compute if not self.trained and self.vae == self.compute else torch.float32


def load_components(model: ModelSection, precision: LoadPrecision | None = None) -> Components:
    """Load and freeze the base named by the recipe's `model` section (fp32 unless `precision` says)."""
    precision = precision or LoadPrecision()
    kind, where = resolve_base(model.base)
    vae = _load_vae(model, precision.vae) if model.vae else None
    if kind == "file":
        _refuse_pickle(model, where)
        family = _chosen(model) or family_of_checkpoint(where, model.allow_pickle)
        pipe = _load_single_file(model, where, family, vae, precision.single())
        family = _chosen(model) or family
    else:
        pipe = _load_pretrained(model, kind, where, vae, precision.by_component())
        family = _chosen(model) or _detect(pipe, model.base)
    _check_fits(pipe, family, model)
    comps = _from_pipeline(pipe, family, model, where)
    freeze(comps)
    quantize_components(comps, model, precision.compute)
    return comps


def _check_fits(pipe, family: Family, model: ModelSection) -> None:
    """A `model.family` forced onto a base of another family leaves the family's parts empty: say so here,
    not as an AttributeError at the first caption."""
    wanted = [family.denoiser_name, family.tokenizer_names[0],
              *(n for n in family.text_encoder_names if n not in model.drop_text_encoders)]
    missing = [n for n in wanted if getattr(pipe, n, None) is None]
    if missing:
        raise ModelError(f"model.base '{model.base}' has no {missing[0]} for a {family.name} model "
                         f"(model.family: {model.family}); set model.family: auto, or the base's own family")


def quantize_components(comps: Components, model: ModelSection, compute: torch.dtype) -> None:
    """`model.quantize` (denoiser) and `model.quantize_text_encoders`: frozen linear layers converted in
    place; nf4 / int8 weights are quantized when the trainer moves each part to its device."""
    from finetune.models.quantize import quantize_module

    if model.quantize != "none":
        quantize_module(comps.denoiser, model.quantize, compute, what="model.quantize")
    if model.quantize_text_encoders != "none":
        for enc in comps.text_encoders:
            quantize_module(enc, model.quantize_text_encoders, compute, what="model.quantize_text_encoders")


def _chosen(model: ModelSection) -> Family | None:
    return FAMILIES[model.family] if model.family != "auto" else None


def _detect(pipe, base: str) -> Family:
    index = {k: v for k, v in pipe.config.items() if not k.startswith("_")}
    encoder = getattr(pipe, "text_encoder", None)
    encoder_config = encoder.config.to_dict() if encoder is not None else {}
    try:
        denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
        return family_from_configs(index, dict(denoiser.config) if denoiser is not None else {}, encoder_config)
    except NotImplementedError as e:
        raise ModelError(f"model.base '{base}': {e}") from None


def _pipeline_class(model: ModelSection):
    import diffusers

    if model.family != "auto":
        return getattr(diffusers, FAMILIES[model.family].pipeline_class)
    return diffusers.DiffusionPipeline


def _load_vae(model: ModelSection, dtype: torch.dtype = torch.float32):
    """`model.vae`: a replacement VAE (e.g. an fp16-safe SDXL VAE), a diffusers folder or hub id."""
    from diffusers import AutoencoderKL

    path = Path(model.vae).expanduser()
    kind, where = ("folder", str(path)) if path.is_dir() else ("hub", model.vae)
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        raise ModelError(f"model.vae '{model.vae}': give a diffusers VAE folder or hub id, not a single file")
    try:
        return AutoencoderKL.from_pretrained(where, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelError(_load_failure(model.vae, kind, e, key="model.vae")) from None


def _load_pretrained(model: ModelSection, kind: str, where: str, vae=None, dtypes: dict | None = None):
    cls = _pipeline_class(model)
    kwargs: dict[str, Any] = {"dtype": dtypes or torch.float32, "revision": model.revision,
                              "variant": model.variant}
    if vae is not None:
        kwargs["vae"] = vae
    for name in model.drop_text_encoders:  # e.g. SD3 without T5: the pipeline then pads with zeros
        kwargs[name] = None
        kwargs[name.replace("text_encoder", "tokenizer")] = None
    if kind == "folder":
        from finetune.models.detect import read_json

        index = read_json(Path(where) / "model_index.json")  # damaged: one line naming the file
        if "safety_checker" in index:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
    else:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        return cls.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(_load_failure(model.base, kind, e)) from None


def _load_failure(base: str, kind: str, e: Exception, key: str = "model.base") -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if kind == "hub" and offline:
        return (
            f"{key} '{base}' is not in the local Hugging Face cache and the hub is offline "
            f"(HF_HUB_OFFLINE=1): download it once with `hf download {base}` or set {key} to a local folder"
        )
    if kind == "hub":
        return f"{key} '{base}' could not be loaded from the hub ({str(e).splitlines()[0]}); check the id"
    return f"{key} '{base}' could not be loaded: {str(e).splitlines()[0]}"


def _refuse_pickle(model: ModelSection, where: str) -> None:
    if where.lower().endswith(PICKLE_SUFFIXES) and not model.allow_pickle:
        raise ModelError(
            f"model.base '{model.base}' is a pickle checkpoint, which can run code when loaded; convert it to "
            ".safetensors, or set model.allow_pickle: true to load it with weights_only=True"
        )


def _load_single_file(model: ModelSection, where: str, family: Family, vae=None, dtype=torch.float32):
    """An original-layout checkpoint through diffusers' from_single_file, as the detected family's pipeline.
    diffusers needs the matching diffusers configs: `model.config`, else it fetches the family's reference
    repo from the hub (impossible offline, and wrong for v-prediction SD 2.x bases without the config)."""
    import diffusers

    cls = getattr(diffusers, family.pipeline_class)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if vae is not None:
        kwargs["vae"] = vae
    if model.config:
        kwargs["config"] = str(resolve_base(model.config)[1])
    try:
        return cls.from_single_file(where, **kwargs)
    except Exception as e:  # noqa: BLE001 - torch, safetensors and diffusers each raise their own on a bad file
        raise ModelError(
            f"model.base '{model.base}': single-file {family.name} checkpoint could not be loaded "
            f"({(str(e).splitlines() or [type(e).__name__])[0][:200]}); offline, set model.config to a diffusers folder (or cached hub id) "
            "of the same architecture"
        ) from None


def _from_pipeline(pipe, family: Family, model: ModelSection, where: str) -> Components:
    from diffusers import DDPMScheduler

    # no x0 clipping: no SD model wants it, and samplers built from this config (validation, class images)
    # would otherwise inherit DDPM's default and clip latents to [-1, 1] for bases whose config omits it (SDXL)
    if family.objective == "ddpm":
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
        prediction = model.prediction_type
        if prediction == "auto":
            prediction = scheduler.config.get("prediction_type", "epsilon")
        scheduler.register_to_config(prediction_type=prediction)
        sampler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction)
    else:
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        prediction, sampler = "flow", type(pipe.scheduler).from_config(pipe.scheduler.config)
    denoiser = getattr(pipe, family.denoiser_name)
    set_attention(denoiser, model.attention)
    present = [(n, t) for n, t in zip(family.text_encoder_names, family.tokenizer_names, strict=True)
               if getattr(pipe, n, None) is not None]
    return Components(
        denoiser=denoiser,
        vae=pipe.vae,
        text_encoders=[getattr(pipe, n) for n, _ in present],
        tokenizers=[getattr(pipe, t) for _, t in present],
        scheduler=scheduler,
        family=family,
        base=model.base,
        source=where,
        prediction_type=prediction,
        text_encoder_names=tuple(n for n, _ in present),
        max_sequence_length=model.max_sequence_length,
        # the base's own sampler, for `validation.scheduler: base`; its pipeline settings the family keeps
        extras={"sampler": sampler,
                "pipeline_config": {k: pipe.config[k] for k in family.pipeline_config_keys if k in pipe.config}},
    )


def set_attention(denoiser, kind: str) -> None:
    """`model.attention`: the denoiser's attention kernel (validation and class images use the same denoiser),
    through diffusers' attention dispatcher (finetune/models/attention.py)."""
    from finetune.models.attention import set_attention as through_dispatcher

    through_dispatcher(denoiser, kind)


def freeze(comps: Components) -> None:
    """Freeze everything; methods unfreeze or inject what they train."""
    for module in comps.named_modules().values():
        module.requires_grad_(False)
        module.eval()


def cast_frozen(comps: Components, dtype: torch.dtype, vae_dtype: torch.dtype) -> None:
    """Frozen weights to the compute dtype; trained parameters stay (or become) fp32; weights stored
    quantized (bitsandbytes bytes, fp8) keep their form; weights the libraries keep in fp32 at this dtype
    (`kept_in_fp32`: T5's `wo` in fp16) stay fp32, as the stock pipeline loads them."""
    from finetune.models.keep_fp32 import kept_in_fp32
    from finetune.models.quantize import is_stored_quantized

    for name, module in comps.named_modules().items():
        target = vae_dtype if name == "vae" else dtype
        kept = kept_in_fp32(module, target)
        for p in module.parameters():
            if p.requires_grad or id(p) in kept:  # peft gives an adapter its base layer's float dtype: fp8 too
                p.data = p.data.to(torch.float32)
            elif not is_stored_quantized(p):
                p.data = p.data.to(target)
