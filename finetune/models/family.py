"""Model families: what differs between architectures, asked for by the trainer, methods and exporters.

A family owns the denoiser (a U-Net or a transformer; `denoiser` everywhere outside the family), its text
encoders and how captions become conditioning, how a batch becomes the denoiser's inputs (latent packing,
position ids, timestep scaling, pooled text, guidance), which training objective fits it, and the names its
weights have in the files other tools read. The trainer never branches on a family name: it calls
`encode_prompt`, `predict` and `objective`.
Exporters read the family's tables: `kohya_names` (LoRA keys for ComfyUI / AUTOMATIC1111), `single_file_text`
(how an original checkpoint stores the text encoders), `embedding_keys` and the metadata ids.

Each family is one file in finetune/models/families/ that builds a `Family` (or subclass); the registry, the
list of them all, is `finetune.models.families.FAMILIES`. Nothing here imports torch at module level: recipes
validate family names without loading anything heavy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from finetune.export.layouts import ClipNames, ModuleNames, UNetGeometry, UNetNames
from finetune.export.ldm import ClipCheckpoint
from finetune.models.sampling import Sampling, Variant

if TYPE_CHECKING:
    import torch

    from finetune.models.components import Components


# the U-Net block layout of the real models (what a LoRA file for them is named after)
#: a U-Net's blocks for regional compile: its down, middle and up blocks
UNET_BLOCKS = ("down_blocks", "mid_block", "up_blocks")
SD_GEOMETRY = UNetGeometry(layers_per_block=2, up_attention=(False, True, True, True))
SDXL_GEOMETRY = UNetGeometry(layers_per_block=2, up_attention=(True, True, False))


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_class: str = "StableDiffusionPipeline"
    #: the pipeline component that denoises, and its diffusers class (detection reads model_index.json)
    denoiser_name: str = "unet"
    denoiser_class: str = "UNet2DConditionModel"
    text_encoder_names: tuple[str, ...] = ("text_encoder",)
    tokenizer_names: tuple[str, ...] = ("tokenizer",)
    #: text encoders a text-encoder LoRA adapts (None: all; FLUX and SD3: the CLIPs, never T5)
    lora_text_encoders: tuple[str, ...] | None = None
    #: text encoders a recipe may leave out (`model.drop_text_encoders`), e.g. SD3's T5
    optional_text_encoders: tuple[str, ...] = ()
    #: 'ddpm' (epsilon / v-prediction) or 'flow' (rectified flow); see finetune/train/objectives.py
    objective: str = "ddpm"
    #: rectified flow: the family's defaults for `train.flow` keys left at 'auto' (sampling, resolution_shift)
    flow_defaults: dict[str, Any] = field(default_factory=dict)
    #: side of the latent patches the denoiser turns into tokens (transformers: 2; U-Nets: 1)
    patch_size: int = 1
    #: default `model.max_sequence_length` of the T5-style encoder, where the family has one
    max_sequence_length: int | None = None
    #: how each trainable component is named in kohya/LyCORIS LoRA keys (ComfyUI / A1111 LoRA files)
    kohya_names: dict[str, ModuleNames] = field(default_factory=lambda: {
        "unet": UNetNames("lora_unet", style="diffusers", geometry=SD_GEOMETRY),
        "text_encoder": ClipNames("lora_te", also=("lora_te1",)),
    })
    #: how an original single-file checkpoint stores each text encoder
    single_file_text: dict[str, Any] = field(
        default_factory=lambda: {"text_encoder": ClipCheckpoint("cond_stage_model.transformer.")}
    )
    #: more LoRA layouts than diffusers and kohya: export format -> module with detect / read / write
    #: (FLUX: 'bfl', the fused Black Forest Labs names sd-scripts and Forge read)
    lora_layouts: dict[str, str] = field(default_factory=dict)
    #: an original single-file checkpoint can be written for this family (finetune/export/ldm.py)
    single_file_writer: bool = True
    #: `ss_base_model_version` of kohya metadata (A1111 reads it, with `ss_v2`, to sort LoRAs by base)
    base_version: str = "sd_v1"
    ss_v2: bool = False
    #: `modelspec.architecture` per prediction type (Stability's model spec ids)
    modelspec_arch: dict[str, str] = field(
        default_factory=lambda: {"epsilon": "stable-diffusion-v1", "v_prediction": "stable-diffusion-v1"}
    )
    #: prompt weighting (tools/generate.py): the hidden state the U-Net reads, and whether the last encoder's
    #: pooled output conditions it too
    prompt_layer: str = "last"
    pooled_prompt: bool = False
    #: key of each text encoder's vectors in A1111 / ComfyUI embedding files
    embedding_keys: dict[str, str] = field(default_factory=lambda: {"text_encoder": "emb_params"})
    #: the VAE overflows in fp16 (SDXL): keep it in fp32 unless the recipe says otherwise
    vae_fp16_unsafe: bool = False
    #: extra constructor arguments of `pipeline_class` when we assemble it from components
    pipeline_kwargs: dict[str, Any] = field(
        default_factory=lambda: {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    )
    #: settings of the base's own pipeline config (model_index.json) that pipelines we assemble must keep
    #: (FLUX.2 [klein]: `is_distilled`, which switches classifier-free guidance off)
    pipeline_config_keys: tuple[str, ...] = ()
    #: LoRA target presets: module-name suffixes as peft matches them, or one regex peft full-matches
    lora_presets: dict[str, list[str] | str] = field(default_factory=dict)
    #: validation sampler when the recipe says `validation.scheduler: auto`
    default_sampler: str = "ddim"
    #: validation guidance scale when the recipe leaves `validation.guidance_scale` null
    default_guidance: float = 7.5
    #: the denoiser's block lists (ModuleList attributes), in order: what `train.block_swap` streams from the
    #: CPU (families whose gradient checkpointing wraps each block of these lists)
    swap_blocks: tuple[str, ...] = ()
    #: what `train.compile: blocks` compiles, one block at a time (attributes: a block list or one block); empty:
    #: the swap_blocks, else the denoiser's own `_repeated_blocks` (diffusers' regional-compile classes)
    compile_blocks: tuple[str, ...] = ()
    #: how `train.routing` (TREAD) finds the image tokens in the swap_blocks' arguments: 'text_first_rope'
    #: (`hidden_states`, and `image_rotary_emb` over text-then-image positions: FLUX), 'plain' (`hidden_states`,
    #: positions added before the blocks: SD3); None: no token routing (finetune/train/routing.py)
    token_routing: str | None = None
    #: cache text embeddings (and release the encoders) unless the recipe says otherwise: large encoders
    cache_text_by_default: bool = False
    #: new token embeddings (Textual Inversion, pivotal tuning) are supported for this family's encoders
    textual_inversion: bool = True
    #: single-file checkpoints: a key starting with any of these names this family (checked by priority)
    single_file_signs: tuple[str, ...] = ()
    #: detection order: higher first (specific families before the SD 1.x fallback)
    priority: int = 0
    #: the text encoder is a large language model used frozen (its outputs cached): its name, for the one-line
    #: refusal of a recipe that would train it
    frozen_text_encoder: str | None = None
    #: text masks the pipeline takes beside the embeddings (validation with pre-encoded prompts): pipeline
    #: keyword (as in the encoded text) -> the dtype it wants ('bool', 'long'); the negative's as 'negative_<key>'
    text_masks: dict[str, str] = field(default_factory=dict)
    #: conditioning images (data.conditioning: an edit's input, reference photos) one example can carry; 0: the
    #: family takes none. How they enter the denoiser is `predict`'s business (batch["references"])
    max_conditions: int = 0
    #: the pipeline that takes conditioning images (validation pairs, `tools/generate.py --image`)
    edit_pipeline_class: str | None = None
    #: the text encoder sees the conditioning images too (Qwen-Image-Edit's vision-language encoder): prompts are
    #: encoded with them (`encode_conditioned_prompt`) and cached text is keyed on them
    prompt_reads_conditions: bool = False
    #: how the family's undistilled bases sample (steps, guidance), where its publisher says; None: the recipe's
    #: defaults and `default_guidance` (finetune/models/sampling.py)
    sampling: Sampling | None = None
    #: the family's distilled (and other) published variants, told apart by config values or name words: the
    #: first that fits a base gives its sampling defaults and what it was distilled for
    variants: tuple[Variant, ...] = ()
    #: bases with several denoisers that split the noise levels between them (Wan 2.2 A14B's high- and
    #: low-noise experts): `model.experts` value -> pipeline slot. Each trained expert trains only on the
    #: timesteps it owns (`expert_ranges`); several take turns by optimizer step
    experts: dict[str, str] = field(default_factory=dict)
    #: frozen pipeline parts besides the denoiser, VAE, text encoders and tokenizers that the family reads (Wan 2.1
    #: image-to-video: the CLIP image encoder and its processor; Qwen-Image-Edit: its 'processor'); loaded with
    #: the base (or by `load_component`), moved and cast with it, handed to every pipeline built over it
    extra_parts: tuple[str, ...] = ()
    #: the latents have a time axis ([B, C, F, H, W]): the data path samples clips of frames for it
    video: bool = False
    #: sampling starts from an image (image-to-video): validation passes the pipeline `image`, the first frame
    #: of the first training clip
    start_image: bool = False

    # ------------------------------------------------------------------------------------- detection
    def matches(self, model_index: dict[str, Any], denoiser_config: dict[str, Any],
                text_encoder_config: dict[str, Any]) -> bool:
        """True when a diffusers folder with these configs is this family (default: the denoiser class)."""
        entry = model_index.get(self.denoiser_name)
        return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] == self.denoiser_class

    # ------------------------------------------------------------------------------------- text
    def tokenize(self, comps: Components, captions: list[str]) -> list[torch.Tensor]:
        out = []
        for tok in comps.tokenizers:
            ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            out.append(ids)
        return out

    def encode_prompt(self, comps: Components, captions: list[str], device: Any) -> dict[str, torch.Tensor]:
        """Captions -> the text conditioning the denoiser takes (SD 1/2: last hidden state of one CLIP encoder)."""
        (ids,) = self.tokenize(comps, captions)
        encoder = comps.text_encoders[0]
        return {"prompt_embeds": encoder(ids.to(device), return_dict=False)[0]}

    def encode_conditioned_prompt(self, comps: Components, captions: list[str], images: list[torch.Tensor] | None,
                                  device: Any) -> dict[str, torch.Tensor]:
        """Captions with the example's conditioning images (each [B, 3, H, W] in [-1, 1]) -> text conditioning.
        Only families whose text encoder sees the images (`prompt_reads_conditions`) read them."""
        return self.encode_prompt(comps, captions, device)

    def load_component(self, name: str, where: str, revision: str | None = None) -> Any:
        """One of `extra_parts`, loaded by the family from the base `where` (a folder or hub id); None lets
        diffusers load it with the pipeline."""
        return None

    def edit_kwargs(self, images: list, size: tuple[int, int]) -> dict[str, Any]:
        """Validation conditioning images (PIL, already at the training geometry) as the edit pipeline's keyword
        arguments for an output of `size` (width, height). Most edit pipelines take a list."""
        return {"image": list(images)}

    def sequence_length(self, comps: Components) -> int | None:
        """Tokens per caption of the T5-style / LLM encoder: the recipe's `model.max_sequence_length`, else this
        variant's default (None: the family's encoders have a fixed length, e.g. CLIP's 77)."""
        return comps.max_sequence_length or self.default_sequence_length(comps.denoiser)

    def default_sequence_length(self, denoiser) -> int | None:
        """The caption length the base was trained with, when the denoiser's config tells variants apart."""
        return self.max_sequence_length

    def guidance_kwargs(self, pipe, scale: float | None) -> dict[str, Any]:
        """The validation guidance scale as the pipeline's keyword arguments (None: the family's default);
        here classifier-free guidance. Qwen-Image: true_cfg_scale; FLUX: distilled guidance or true CFG."""
        return {"guidance_scale": self.default_guidance if scale is None else scale}

    def pipeline_prompt_kwargs(self, text: dict[str, torch.Tensor], negative: dict[str, torch.Tensor] | None
                               ) -> dict[str, Any]:
        """Pre-encoded text as the pipeline's keyword arguments (validation with the encoders released): the
        embeddings, pooled ones where the family has them, and its `text_masks`; the negative's under
        'negative_' (a negative is used only where the pipeline samples with CFG)."""
        import torch

        kwargs: dict[str, Any] = {}
        for prefix, part in (("", text), ("negative_", negative)):
            if part is None:
                continue
            kwargs |= {prefix + k: part[k] for k in ("prompt_embeds", "pooled_prompt_embeds") if k in part}
            kwargs |= {prefix + k: part[k].to(getattr(torch, dtype)) for k, dtype in self.text_masks.items()}
        return kwargs

    # ------------------------------------------------------------------------------------- latents
    def encode_latents(self, vae, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the latents the objective noises: the distribution's mode (deterministic,
        cache-friendly), normalised as the pipeline un-normalises before decoding; by default
        `(z - shift_factor) * scaling_factor`."""
        latents = vae.encode(pixel_values.to(vae.device, vae.dtype, non_blocking=True)).latent_dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents.float() - shift) * vae.config.scaling_factor

    def encode_conditions(self, comps: Components, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Conditioning derived from the training target itself (image-to-video: the first frame, encoded as
        the pipeline encodes its input image), keyed by name; computed (and cached) with the latents and
        handed to `predict` as `batch["conditions"]`. Default: none."""
        return {}


    # ------------------------------------------------------------------------------------- denoiser
    def training_scheduler(self, scheduler):
        """The flow-matching scheduler the objective draws noise levels from, built from the base's own
        sampler (default: a copy of it; Wan ships UniPC and trains on the matching FlowMatch grid)."""
        return type(scheduler).from_config(scheduler.config)

    def expert_ranges(self, pipeline_config: dict[str, Any], scheduler) -> dict[str, tuple[float, float]]:
        """Timesteps (0..num_train_timesteps) each expert slot owns, as the pipeline switches between them."""
        return {}

    def predict(self, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, text: dict[str, torch.Tensor],
                batch: dict[str, Any]) -> torch.Tensor:
        """The denoiser's output for noisy latents in the VAE's latent layout [B, C, H, W]."""
        return denoiser(noisy, timesteps, **self.unet_kwargs(text, batch), return_dict=False)[0]

    def unet_kwargs(self, text: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, Any]:
        """U-Net families: keyword arguments of the U-Net call besides the noisy latents and the timesteps."""
        return {"encoder_hidden_states": text["prompt_embeds"]}

    # ------------------------------------------------------------------------------------- recipe
    def check_recipe(self, recipe) -> None:
        """Options that make no sense for this family: a ValueError naming the key (recipe time)."""
        model, train = recipe.model, recipe.train
        if self.frozen_text_encoder and recipe.method.trains_text_encoder():
            key = "method.text_encoder.enabled" if hasattr(recipe.method, "text_encoder") else "method.train_text_encoder"
            raise ValueError(f"{key}: the {self.name} family's text encoder ({self.frozen_text_encoder}) is not trained "
                             "here; train the transformer only (remove the key)")
        if recipe.method.adds_tokens() and not self.textual_inversion:
            raise ValueError(f"method.name: '{recipe.method.name}' (new token embeddings) is not supported for the "
                             f"{self.name} family yet; use lora or full")
        self._check_conditioning(recipe)
        if recipe.train.routing is not None and self.token_routing is None:
            raise ValueError(f"train.routing (token routing) is available for flux and sd3; the {self.name} family's "
                             "blocks do not route tokens here: remove train.routing")
        if recipe.train.block_swap and not self.swap_blocks:
            raise ValueError(f"train.block_swap streams transformer blocks (sd3, flux); the {self.name} family's "
                             "denoiser has no block lists to swap: set train.block_swap: 0")
        if recipe.data.video is not None and not self.video:
            raise ValueError(f"data.video: the {self.name} family makes images, not clips; remove data.video and the "
                             "video sources (or use a video base: Wan)")
        if model.experts != "all" and model.experts not in self.experts:
            can = f"one of all, {', '.join(self.experts)}" if self.experts else "all (it has one denoiser)"
            raise ValueError(f"model.experts: '{model.experts}' is not an expert of a {self.name} base; use {can}")
        bad = [n for n in model.drop_text_encoders if n not in self.optional_text_encoders]
        if bad:
            can = ", ".join(self.optional_text_encoders) or "none"
            raise ValueError(f"model.drop_text_encoders: {bad[0]} cannot be dropped from a {self.name} base "
                             f"(optional here: {can})")
        if self.objective == "flow":
            if train.min_snr_gamma is not None:
                raise ValueError(f"train.min_snr_gamma is a DDPM (epsilon / v) weighting; the {self.name} family "
                                 "trains with rectified flow: remove it, or use train.flow.weighting")
            if model.prediction_type != "auto":
                raise ValueError(f"model.prediction_type '{model.prediction_type}' does not apply to the "
                                 f"{self.name} family (rectified flow); remove it")
            if train.flow.shift is not None and train.flow.resolution_shift:
                raise ValueError("train.flow.shift is a static shift and train.flow.resolution_shift: true "
                                 "replaces it by one that follows the image size (the scheduler applies one, not "
                                 "both): remove one of them")
            if recipe.validation.scheduler not in ("auto", "base"):
                raise ValueError(f"validation.scheduler '{recipe.validation.scheduler}' is a DDPM sampler; the "
                                 f"{self.name} family samples with its base's flow-matching scheduler: use auto")
            return
        defaults = type(train.flow)().model_dump()
        changed = [k for k, v in train.flow.model_dump().items() if v != defaults[k]]
        if changed:
            raise ValueError(f"train.flow.{changed[0]} applies to rectified-flow families (sd3, flux, ...); the "
                             f"{self.name} family trains with DDPM: remove it")

    def _check_conditioning(self, recipe) -> None:
        cond = recipe.data.conditioning
        if cond is None:
            if recipe.validation.images:
                raise ValueError("validation.images are the conditioning images of validation pairs: they need "
                                 "paired training data (data.conditioning)")
            return
        if not self.max_conditions:
            raise ValueError(f"data.conditioning: the {self.name} family takes no conditioning images; use a base "
                             "of a family that does (FLUX.1 / Kontext, FLUX.2 [klein], Qwen-Image-Edit: README's "
                             "family table)")
        if cond.count > self.max_conditions:
            raise ValueError(f"data.conditioning.count: the {self.name} family takes at most {self.max_conditions} "
                             f"conditioning image(s) per example (got {cond.count})")
        if self.prompt_reads_conditions and recipe.data.random_flip and cond.role == "spatial":
            raise ValueError(f"data.random_flip: the {self.name} family's text encoder sees the conditioning images, "
                             "and a flipped pair would need its prompt encoded twice; set random_flip: false")
    def export_groups(self, trained: list[str]) -> list[tuple[str, dict[str, str]]]:
        """How the trained modules split into adapter files: (file-name suffix, {module: the component name it
        has in that file}). Default: one file, named as they are (Wan 2.2: one file per expert)."""
        return [("", {n: n for n in trained})]

    def unused_modules(self, denoiser) -> list[str]:
        """Modules of `denoiser` whose output never reaches the prediction (Qwen-Image: the last block's text
        stream). Adapters leave them out: they would never train, and DDP refuses parameters without grads."""
        return []

    def lora_targets(self, preset: str) -> list[str] | str:
        if preset not in self.lora_presets:
            from finetune.errors import ModelError

            raise ModelError(f"method.targets '{preset}' is not a preset of the {self.name} family; "
                             f"its presets are {', '.join(self.lora_presets)}, or list module-name suffixes")
        targets = self.lora_presets[preset]
        return targets if isinstance(targets, str) else list(targets)


def llm_flow_transformer(**fields: Any) -> dict[str, Any]:
    """Family settings shared by rectified-flow transformers conditioned by one frozen language model (Z-Image,
    Qwen-Image, FLUX.2 [klein]), with the family's own `fields` on top: no text-encoder LoRA, Textual Inversion
    or single-file checkpoints, text embeddings cached by default, the pipeline's own sampler."""
    return {
        "denoiser_name": "transformer", "lora_text_encoders": (), "objective": "flow", "max_sequence_length": 512,
        "embedding_keys": {}, "pipeline_kwargs": {}, "default_sampler": "base", "cache_text_by_default": True,
        "textual_inversion": False, "single_file_writer": False, "single_file_text": {}, "priority": 30, **fields,
    }
