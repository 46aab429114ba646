"""Load a base model's components, and freeze them.

`load_components(base, options, precision)` takes plain values: the `Base` the recipe resolved and completed
(finetune/models/base.py: a hub id, a local diffusers folder, a single-file checkpoint or a toy base), how to
load it (`LoadOptions`: the recipe's `model` section as the trainer translates it) and in which dtypes
(`LoadPrecision`). Everything is loaded frozen: by default in fp32; the trainer passes a `LoadPrecision` so
that frozen parts load straight in the compute dtype (a 12B FLUX transformer is 24 GB of host RAM in bf16,
48 GB in fp32) and only what a method trains in place loads in fp32. `quantize` / `quantize_text_encoders`
then convert the frozen linear layers (finetune/models/quantize.py). The trainer casts what is left after the
method has chosen what trains (`cast_frozen`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from finetune.errors import ModelError
from finetune.models.base import SINGLE_FILE_SUFFIXES, Base, load_failure
from finetune.models.family import Family


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
    base: Base  # what was loaded, its family known
    prediction_type: str  # 'epsilon' / 'v_prediction' (DDPM) or 'flow'
    text_encoder_names: tuple[str, ...] = ()
    max_sequence_length: int | None = None  # T5-style encoders: tokens per caption (None: family default)
    extras: dict[str, Any] = field(default_factory=dict)
    #: every denoiser of the base by pipeline slot (one, unless the family has experts: Wan 2.2 A14B has two);
    #: `denoiser` is the first of `trained_experts`
    experts: dict[str, Any] = field(default_factory=dict)
    trained_experts: tuple[str, ...] = ()  # the experts that train, taking turns by optimizer step
    expert_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)  # timesteps each expert owns
    parts: dict[str, Any] = field(default_factory=dict)  # the family's extra_parts (image encoder, ...)

    def __post_init__(self):
        if not self.text_encoder_names:
            self.text_encoder_names = tuple(self.family.text_encoder_names[: len(self.text_encoders)])
        if not self.experts:
            self.experts = {self.family.denoiser_name: self.denoiser}
        if not self.trained_experts:
            self.trained_experts = (next(n for n, m in self.experts.items() if m is self.denoiser),)

    @property
    def source(self) -> str:
        """Where the base was loaded from: the resolved folder, file or hub id."""
        return self.base.location

    @property
    def denoiser_name(self) -> str:
        return self.trained_experts[0]

    def expert_at(self, step: int) -> tuple[str, tuple[float, float] | None]:
        """The expert that trains at optimizer step `step` (several take turns) and the timesteps it owns
        (None: all of them)."""
        name = self.trained_experts[step % len(self.trained_experts)]
        return name, self.expert_ranges.get(name)

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
        mods = {**self.experts, "vae": self.vae}
        for name, enc in zip(self.text_encoder_names, self.text_encoders, strict=True):
            mods[name] = enc
        mods |= self.part_modules()
        return mods

    def part_modules(self) -> dict[str, torch.nn.Module]:
        """The family's extra parts that are modules (frozen with the base, moved to the device with it)."""
        return {n: p for n, p in self.parts.items() if isinstance(p, torch.nn.Module)}

    def pipeline(self, denoiser=None, text_encoders=None, scheduler=None, edit: bool = False):
        """A diffusers pipeline over these components (for validation and class-image generation); `edit`: the
        family's pipeline that takes conditioning images."""
        import diffusers

        family = self.family
        cls = getattr(diffusers, family.edit_pipeline_class if edit else family.pipeline_class)
        encoders = dict(zip(self.text_encoder_names, text_encoders or self.text_encoders, strict=True))
        parts: dict[str, Any] = {**self.experts, self.denoiser_name: denoiser or self.denoiser, "vae": self.vae,
                                 "scheduler": scheduler or self.scheduler, **self.parts}
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


@dataclass(frozen=True)
class LoadOptions:
    """How to load a base, besides where it is and in which dtypes: the recipe's `model` keys as plain values
    (the trainer translates them: `ModelSection.load_options`)."""

    variant: str | None = None  # weight variant on the hub, e.g. 'fp16'
    vae: str | None = None  # a replacement VAE: a diffusers folder or hub id
    drop_text_encoders: tuple[str, ...] = ()  # optional text encoders not to load (SD3's T5)
    attention: str = "sdpa"  # 'sdpa', 'eager' or 'xformers' (see set_attention)
    prediction_type: str = "auto"  # DDPM target; 'auto' reads the base's scheduler
    max_sequence_length: int | None = None  # T5-style encoders: tokens per caption (None: the family's)
    quantize: str = "none"  # the frozen denoiser's linear layers: 'nf4', 'int8', 'fp8' or 'none'
    quantize_text_encoders: str = "none"
    experts: str = "all"  # a family with experts (Wan 2.2 A14B): 'all', or the one expert that trains


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
        out = {"default": self.compute, "vae": self.vae, "unet": denoiser, "transformer": denoiser,
               "transformer_2": denoiser}
        out |= {f"text_encoder{s}": text for s in ("", "_2", "_3")}
        return out

    def single(self) -> torch.dtype:
        """One dtype for a single-file load (diffusers takes only one there): the compute dtype when every
        part may load in it, else fp32 (cast down afterwards)."""
        return self.compute if not self.trained and self.vae == self.compute else torch.float32


def load_components(base: Base, options: LoadOptions | None = None,
                    precision: LoadPrecision | None = None) -> Components:
    """Load and freeze `base`, a complete one (its family known: `Base.complete()`), fp32 unless `precision`
    says."""
    if base.problem:
        raise ModelError(base.problem)
    if base.family is None:
        raise ValueError(f"{base.name}: load_components takes a complete base (Base.complete()), its family known")
    options, precision = options or LoadOptions(), precision or LoadPrecision()
    vae = _load_vae(options.vae, precision.vae) if options.vae else None
    if base.form == "file":
        pipe = _load_single_file(base, vae, precision.single())
    else:
        pipe = _load_pretrained(base, options, vae, precision.by_component())
    _check_fits(pipe, base, options)
    comps = _from_pipeline(pipe, base, options)
    freeze(comps)
    quantize_components(comps, options, precision.compute)
    return comps


def load_denoiser(base: Base, options: LoadOptions, precision: LoadPrecision, vae=None):
    """Only the denoiser of a complete `base` (frozen, quantized as `options` say), its own sampler and the
    pipeline settings its family keeps: a second base that shares the first one's encoders and `vae`
    (`validation.base`, finetune/train/target.py)."""
    family = base.family
    shared = replace(options, drop_text_encoders=tuple(family.text_encoder_names))  # nor their tokenizers
    pipe = _load_pretrained(base, shared, vae, precision.by_component())
    denoiser = getattr(pipe, family.denoiser_name)
    set_attention(denoiser, options.attention)
    denoiser.requires_grad_(False).eval()
    if options.quantize != "none":
        from finetune.models.quantize import quantize_module

        quantize_module(denoiser, options.quantize, precision.compute, what="model.quantize")
    keep = {k: pipe.config[k] for k in family.pipeline_config_keys if k in pipe.config}
    return denoiser, type(pipe.scheduler).from_config(pipe.scheduler.config), keep


def _check_fits(pipe, base: Base, options: LoadOptions) -> None:
    """A `model.family` forced onto a base of another family leaves the family's parts empty: say so here,
    not as an AttributeError at the first caption."""
    family = base.family
    wanted = [family.denoiser_name, family.tokenizer_names[0],
              *(n for n in family.text_encoder_names if n not in options.drop_text_encoders)]
    missing = [n for n in wanted if getattr(pipe, n, None) is None]
    if missing:
        named = family.name if base.forced else "auto"
        raise ModelError(f"model.base '{base.name}' has no {missing[0]} for a {family.name} model "
                         f"(model.family: {named}); set model.family: auto, or the base's own family")


def quantize_components(comps: Components, options: LoadOptions, compute: torch.dtype) -> None:
    """`model.quantize` (denoiser) and `model.quantize_text_encoders`: frozen linear layers converted in
    place; nf4 / int8 weights are quantized when the trainer moves each part to its device."""
    from finetune.models.quantize import quantize_module

    if options.quantize != "none":
        for expert in comps.experts.values():
            quantize_module(expert, options.quantize, compute, what="model.quantize")
    if options.quantize_text_encoders != "none":
        for enc in comps.text_encoders:
            quantize_module(enc, options.quantize_text_encoders, compute, what="model.quantize_text_encoders")


def _load_vae(name: str, dtype: torch.dtype = torch.float32):
    """`model.vae`: a replacement VAE (e.g. an fp16-safe SDXL VAE), a diffusers folder or hub id."""
    from diffusers import AutoencoderKL

    path = Path(name).expanduser()
    kind, where = ("folder", str(path)) if path.is_dir() else ("hub", name)
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        raise ModelError(f"model.vae '{name}': give a diffusers VAE folder or hub id, not a single file")
    try:
        return AutoencoderKL.from_pretrained(where, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelError(load_failure(name, kind, e, key="model.vae")) from None


def _load_pretrained(base: Base, options: LoadOptions, vae=None, dtypes: dict | None = None):
    import diffusers

    # a named family loads as its own pipeline; 'auto' as the one model_index.json names
    cls = getattr(diffusers, base.family.pipeline_class) if base.forced else diffusers.DiffusionPipeline
    kwargs: dict[str, Any] = {"dtype": dtypes or torch.float32, "revision": base.revision,
                              "variant": options.variant}
    if vae is not None:
        kwargs["vae"] = vae
    kwargs.update(_extra_components(base))
    for name in options.drop_text_encoders:  # e.g. SD3 without T5: the pipeline then pads with zeros
        kwargs[name] = None
        kwargs[name.replace("text_encoder", "tokenizer")] = None
    if not base.local or "safety_checker" in base.index:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        return cls.from_pretrained(base.location, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(load_failure(base.name, base.form, e)) from None


def _extra_components(base: Base) -> dict[str, Any]:
    """Pipeline parts the family loads itself (Qwen-Image-Edit's processor); the others diffusers loads."""
    out = {}
    for name in base.family.extra_parts if base.family is not None else ():
        try:
            part = base.family.load_component(name, base.location, base.revision)
        except (OSError, ValueError) as e:
            raise ModelError(load_failure(base.name, base.form, e, key=f"model.base ({name})")) from None
        if part is not None:
            out[name] = part
    return out


def _load_single_file(base: Base, vae=None, dtype=torch.float32):
    """An original-layout checkpoint through diffusers' from_single_file, as the detected family's pipeline.
    diffusers needs the matching diffusers configs: `model.config`, else it fetches the family's reference
    repo from the hub (impossible offline, and wrong for v-prediction SD 2.x bases without the config)."""
    import diffusers

    family = base.family
    cls = getattr(diffusers, family.pipeline_class)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if vae is not None:
        kwargs["vae"] = vae
    if base.config:
        kwargs["config"] = base.config
    try:
        return cls.from_single_file(base.location, **kwargs)
    except Exception as e:  # noqa: BLE001 - torch, safetensors and diffusers each raise their own on a bad file
        raise ModelError(
            f"model.base '{base.name}': single-file {family.name} checkpoint could not be loaded "
            f"({(str(e).splitlines() or [type(e).__name__])[0][:200]}); offline, set model.config to a diffusers folder (or cached hub id) "
            "of the same architecture"
        ) from None


def _from_pipeline(pipe, base: Base, options: LoadOptions) -> Components:
    from diffusers import DDPMScheduler

    family = base.family
    # no x0 clipping: no SD model wants it, and samplers built from this config (validation, class images)
    # would otherwise inherit DDPM's default and clip latents to [-1, 1] for bases whose config omits it (SDXL)
    if family.objective == "ddpm":
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
        prediction = options.prediction_type
        if prediction == "auto":
            prediction = scheduler.config.get("prediction_type", "epsilon")
        scheduler.register_to_config(prediction_type=prediction)
        sampler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction)
    else:
        scheduler = family.training_scheduler(pipe.scheduler)
        prediction, sampler = "flow", type(pipe.scheduler).from_config(pipe.scheduler.config)
    experts, trained = _experts(pipe, base, options.experts)
    for expert in experts.values():
        set_attention(expert, options.attention)
    present = [(n, t) for n, t in zip(family.text_encoder_names, family.tokenizer_names, strict=True)
               if getattr(pipe, n, None) is not None]
    return Components(
        denoiser=experts[trained[0]],
        experts=experts,
        trained_experts=trained,
        expert_ranges=family.expert_ranges(dict(pipe.config), scheduler) if len(experts) > 1 else {},
        parts={n: getattr(pipe, n) for n in family.extra_parts if getattr(pipe, n, None) is not None},
        vae=pipe.vae,
        text_encoders=[getattr(pipe, n) for n, _ in present],
        tokenizers=[getattr(pipe, t) for _, t in present],
        scheduler=scheduler,
        family=family,
        base=base,
        prediction_type=prediction,
        text_encoder_names=tuple(n for n, _ in present),
        max_sequence_length=options.max_sequence_length,
        # the base's own sampler, for `validation.scheduler: base`; its pipeline settings the family keeps
        extras={"sampler": sampler,
                "pipeline_config": {k: pipe.config[k] for k in family.pipeline_config_keys if k in pipe.config}},
    )


def _experts(pipe, base: Base, chosen: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The base's denoisers by pipeline slot, and which of them train (`model.experts`: `chosen`)."""
    family = base.family
    slots = dict.fromkeys([family.denoiser_name, *family.experts.values()])
    experts = {s: getattr(pipe, s) for s in slots if getattr(pipe, s, None) is not None}
    if chosen == "all":
        return experts, tuple(experts)
    slot = family.experts[chosen]
    if slot not in experts:
        raise ModelError(f"model.experts: '{chosen}' ({slot}) is not in the base '{base.name}' (it has "
                         f"{', '.join(experts)}); use all")
    return experts, (slot,)


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
