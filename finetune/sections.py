"""Typed schemas of the recipe sections `model`, `train`, `validation`, `export` and `logging`.

The `data` section lives in `finetune/data/config.py` and each method's section beside its method in
`finetune/methods/`. Every class here is pure pydantic: importing this module must stay cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from finetune.eval import DEFAULT_CLIP, DEFAULT_DINO, METRIC_NAMES
from finetune.eval.prompts import shows_subject as shows
from finetune.toy import TOY_ADAPTERS, TOY_BASES


@dataclass(frozen=True)
class PathRef:
    """Marks a recipe field that names a file or folder on disk: the recipe's path type.

    Training ignores the mark (values stay plain strings, relative to the working folder); the studio reads it
    to confine every such field to its root (finetune/studio/recipes.py), so a new path field is confined by
    being declared with `LocalPath` or `HubOrPath`, or an `Annotated[str, PathRef(...)]` of its own."""

    hub: bool = False  # the value may instead be a hub id ('org/name'), which is no path
    names: tuple[str, ...] = ()  # values that name something built in rather than a path ('latest', 'toy')
    prefixes: tuple[str, ...] = ()  # value beginnings that name something built in ('toy:red circle')
    within: Literal["cwd", "source", "image"] = "cwd"  # where a relative value starts: the working folder, the
    # folder in the sibling `path` field (a file of a data source), or each image's own folder


LocalPath = Annotated[str, PathRef()]
HubOrPath = Annotated[str, PathRef(hub=True)]
BaseRef = Annotated[str, PathRef(hub=True, names=tuple(TOY_BASES))]  # a base: also 'toy' / 'toy-flux'
EvalModel = Annotated[str, PathRef(hub=True, names=("toy",))]  # 'toy': the toy world's shipped tiny model
AdapterRef = Annotated[str, PathRef(hub=True, names=tuple(TOY_ADAPTERS))]  # a LoRA file or folder, hub, or a toy's
ImageRef = Annotated[str, PathRef(prefixes=("toy:",))]  # an image file, or 'toy:<colour> <shape>' (a toy drawing)


def plain_name(v: str | None, what: str = "file name") -> str | None:
    """A file or folder name joined to a folder the recipe names: no separators, no leading '.' or '~', so it
    cannot reach outside that folder (pydantic validator body; raises ValueError)."""
    if v is not None and (not v.strip() or v.strip(".") == "" or any(c in v for c in "/\\\0")
                          or v.startswith((".", "~"))):
        raise ValueError(f"{v!r} is not a plain {what}: no folders, no leading '.' or '~'")
    return v


class StrictModel(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are validated on assignment, and no float
    may be NaN or infinite (no field means infinity; `.inf` for an alpha or a weight would train garbage)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)


SEED_MAX = 2**32 - 1  # numpy's seed range, which accelerate's set_seed passes every seed through


class ModelSection(StrictModel):
    base: BaseRef = Field(
        "toy",
        description="Base model: a hub id, a local diffusers folder, a single-file .safetensors checkpoint, "
        "or 'toy' / 'toy-flux' for the built-in toy bases (SD-shaped / FLUX-shaped).",
    )
    family: str = Field(
        "auto", description="Model architecture (sd1, sd2, sdxl, sd3, ...); 'auto' detects it from the base."
    )
    config: BaseRef | None = Field(
        None,
        description="For a single-file base: a diffusers folder or cached hub id with the matching configs "
        "(needed offline).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the base.")
    variant: str | None = Field(None, description="Weight variant to load from the hub, e.g. 'fp16'.")
    vae: HubOrPath | None = Field(None, description="Optional replacement VAE (hub id or folder).")
    vae_dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="dtype of the frozen VAE; 'auto' uses fp32 where the family's VAE overflows in fp16."
    )
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = Field(
        "auto", description="Training target; 'auto' reads the base's scheduler config."
    )
    attention: Literal["sdpa", "native", "flash", "flash3", "sage", "flex", "cudnn", "xformers", "eager"] = Field(
        "sdpa",
        description="Attention kernel, through diffusers' attention dispatcher: 'sdpa' / 'native' (torch's "
        "scaled-dot-product attention; it picks the flash or memory-efficient kernel itself), 'flash' (the "
        "flash-attn package), 'flash3' (FlashAttention 3, Hopper), 'sage' (sageattention), 'flex' (torch's "
        "flex_attention), 'cudnn' (torch's cuDNN kernel), 'xformers' (the xformers package); the GPU-only ones "
        "need a CUDA device. 'eager' (plain matmul and softmax: slower, more memory; for debugging).",
    )
    allow_pickle: bool = Field(
        False,
        description="Allow pickle checkpoints (.ckpt/.bin/.pt); they are then read with weights_only=True.",
    )
    drop_text_encoders: list[str] = Field(
        default_factory=list,
        description="Optional text encoders not to load, e.g. [text_encoder_3] trains SD3 without T5-XXL.",
    )
    max_sequence_length: int | None = Field(
        None, ge=1, le=4096, description="Tokens per caption for T5-style encoders; default the family's."
    )
    guidance: float | None = Field(
        None, ge=0.0, le=100.0,
        description="Guidance value fed to guidance-distilled denoisers while training (FLUX.1 [dev]); null: 1.0 "
        "(kohya's advice, SimpleTuner's and ai-toolkit's default; diffusers' script and sd-scripts default to 3.5).",
    )
    quantize: Literal["none", "nf4", "int8", "fp8"] = Field(
        "none",
        description="Store the frozen denoiser's linear weights quantized (QLoRA): 'nf4' (bitsandbytes 4-bit "
        "NormalFloat, ~0.52 bytes/weight), 'int8' (bitsandbytes LLM.int8, ~1 byte), 'fp8' (float8 e4m3 storage, "
        "upcast per layer to the compute dtype). Adapters train on top in fp32; exports never hold quantized "
        "weights. See docs/memory.md.",
    )
    quantize_text_encoders: Literal["none", "nf4", "int8", "fp8"] = Field(
        "none", description="The same for the frozen text encoders (e.g. T5-XXL while captions are cached)."
    )
    training_adapter: AdapterRef | None = Field(
        None,
        description="A LoRA applied to the frozen base while training and removed afterwards: never trained, never "
        "exported (a de-distillation adapter lets a LoRA train on a step-distilled base such as FLUX.1 [schnell] "
        "or Z-Image-Turbo without breaking its few steps). A .safetensors file or folder (diffusers, kohya or BFL "
        "names), a hub repo 'org/name' or file 'org/name/file.safetensors', or 'toy-flux-turbo-adapter'.",
    )
    experts: str = Field(
        "all", description="Bases with several denoisers that split the noise levels (Wan 2.2 A14B): which one "
        "trains, 'high_noise' or 'low_noise', or 'all' (they take turns by step); each trains only on its own "
        "timesteps.",
    )

    @field_validator("family")
    @classmethod
    def _family(cls, v: str) -> str:
        from finetune.models.families import FAMILIES  # pure Python: the registry imports no torch

        if v != "auto" and v not in FAMILIES:
            from finetune.errors import did_you_mean

            raise ValueError(f"unknown family{did_you_mean(v, FAMILIES)}; choose auto or one of {', '.join(FAMILIES)}")
        return v

    @field_validator("training_adapter")
    @classmethod
    def _adapter(cls, v: str | None) -> str | None:
        if v is not None:
            from finetune.routes import check_adapter_value

            check_adapter_value(v)
        return v

    @field_validator("attention")
    @classmethod
    def _attention(cls, v: str) -> str:
        from finetune.models.attention import PACKAGES  # pure Python: the table, not torch

        if v in PACKAGES and not _installed(PACKAGES[v][0]):
            raise ValueError(f"'{v}' needs the {PACKAGES[v][0]} package, which is not installed; "
                             f"{PACKAGES[v][1]}, or use sdpa")
        return v

    # the model layer takes plain values, never this section: these two translate it
    def resolve(self):
        """`base` (+ revision, family, config, allow_pickle) as one `Base` value (finetune/models/base.py).
        A recipe does this once, while it validates: `Recipe.base`."""
        from finetune.models.base import resolve_base

        return resolve_base(self.base, self.revision, self.family, config=self.config,
                            allow_pickle=self.allow_pickle)

    def load_options(self):
        """How the loader loads the base, as `LoadOptions` (finetune/models/components.py)."""
        from finetune.models.components import LoadOptions

        return LoadOptions(variant=self.variant, vae=self.vae, drop_text_encoders=tuple(self.drop_text_encoders),
                           attention=self.attention, prediction_type=self.prediction_type,
                           max_sequence_length=self.max_sequence_length, quantize=self.quantize,
                           quantize_text_encoders=self.quantize_text_encoders, experts=self.experts)


class EMASection(StrictModel):
    enabled: bool = Field(False, description="Keep an exponential moving average of the trained parameters.")
    decay: float = Field(
        0.9999, gt=0.0, lt=1.0,
        description="EMA decay per update; diffusers' EMAModel caps it at (1 + n) / (10 + n) after n updates, so "
        "early updates follow the weights closely.",
    )
    update_every: int = Field(1, ge=1, description="Update the EMA every N optimizer steps.")


class RoutingSection(StrictModel):
    """Token routing (TREAD): part of the image tokens skips a window of the denoiser's blocks while training."""

    drop_ratio: float = Field(0.5, gt=0.0, lt=1.0, description="Share of the image tokens that skip the window "
                              "(0.5: half the tokens go through its blocks; more is faster and noisier).")
    first_block: int = Field(2, description="First block of the window, counted over the family's block lists "
                             "in order (FLUX: 19 double- then 38 single-stream blocks); negative counts from the end.")
    last_block: int = Field(-2, description="Last block of the window (inclusive); negative counts from the end.")


class FlowSection(StrictModel):
    """Rectified-flow options (SD3, FLUX and later families); refused for DDPM families."""

    timestep_sampling: Literal["auto", "uniform", "logit_normal", "mode", "sigmoid"] = Field(
        "auto", description="Timestep density; 'auto' uses the family's default (logit_normal for SD3 and FLUX)."
    )
    logit_mean: float = Field(
        0.0, ge=-10.0, le=10.0, description="logit_normal: mean of the normal. Positive moves training toward "
        "clean samples (sigma ~ 1 - u, as diffusers' scripts): the opposite sign of the SD3 paper and sd-scripts.",
    )
    logit_std: float = Field(1.0, gt=0.0, le=10.0, description="logit_normal: standard deviation.")
    mode_scale: float = Field(1.29, ge=-1.0, le=10.0, description="mode: the SD3 paper's scale s.")
    sigmoid_scale: float = Field(1.0, gt=0.0, le=10.0, description="sigmoid: u = sigmoid(scale * N(0, 1)).")
    shift: float | None = Field(
        None, gt=0.0, le=100.0, description="Static timestep shift; null uses the base scheduler's (SD3: 3.0). "
        "Setting it turns the resolution shift off (it replaces the static one)."
    )
    resolution_shift: bool | None = Field(
        None, description="Shift by the image's token count (FLUX's dynamic shift); null: the family's default "
        "(off when train.flow.shift is set)."
    )
    weighting: Literal["none", "sigma_sqrt", "cosmap", "precondition"] = Field(
        "none", description="Loss weighting over noise levels: diffusers' compute_loss_weighting_for_sd3 "
        "(sigma_sqrt, cosmap), or 'precondition': sigma^2, the MSE gradient of SD3's output preconditioning "
        "(x0 predicted as x_t - sigma * v; diffusers' SD3 script by default, sd-scripts' SD3 always). 'none' "
        "(SimpleTuner's choice) is the default: preconditioning learned no better on the toy (docs/families.md).",
    )


class LossSection(StrictModel):
    """The per-element loss and extra weightings (finetune/train/loss.py)."""

    type: Literal["mse", "huber", "smooth_l1"] = Field(
        "mse", description="Element loss: squared error, pseudo-Huber, or smooth L1 (sd-scripts' --loss_type); "
        "Huber and smooth L1 grow linearly for large errors, so outlier images pull less.",
    )
    huber_c: float = Field(0.1, gt=0.0, le=10.0, description="huber / smooth_l1: where the loss turns linear.")
    huber_schedule: Literal["constant", "exponential", "snr"] = Field(
        "snr", description="huber / smooth_l1: how c moves with the noise level (sd-scripts' --huber_schedule): "
        "constant, exponential in the timestep, or 'snr' (near c at high noise, near 1 (MSE-like) at low noise).",
    )
    debiased_estimation: bool = Field(
        False, description="Weight each example by 1/sqrt(SNR) (v-prediction: 1/(SNR+1)), sd-scripts' "
        "--debiased_estimation_loss: less pull from nearly clean timesteps.",
    )

    @model_validator(mode="after")
    def _huber_only(self):
        if self.type == "mse":  # compared with the defaults: a resolved recipe written back holds every key
            for key in ("huber_c", "huber_schedule"):
                if getattr(self, key) != type(self).model_fields[key].default:
                    raise ValueError(f"train.loss.{key} applies to type huber or smooth_l1, not mse; remove it "
                                     "or set train.loss.type")
        return self


class TrainSection(StrictModel):
    output_dir: LocalPath = Field("output/run", description="Folder for checkpoints, samples, logs and exports.")
    max_steps: int = Field(1000, ge=1, description="Optimizer steps to train.")
    batch_size: int = Field(1, ge=1, description="Images per process per micro-batch.")
    gradient_accumulation: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(1e-4, gt=0.0, le=1.0, description="Learning rate of the trained parameters.")
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = Field("constant", description="Learning-rate schedule (diffusers' get_scheduler).")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    optimizer: Literal["adamw", "adamw8bit", "adafactor"] = Field(
        "adamw", description="Optimizer: torch AdamW, bitsandbytes 8-bit AdamW, or transformers Adafactor."
    )
    weight_decay: float = Field(1e-2, ge=0.0, description="Decoupled weight decay.")
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0, description="AdamW beta2.")
    adam_epsilon: float = Field(1e-8, gt=0.0, description="AdamW epsilon.")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="Clip gradients to this norm; null disables.")
    seed: int = Field(42, ge=0, le=SEED_MAX, description="Seed for everything random in the run.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="Compute precision through accelerate; trained parameters stay fp32."
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory in the denoiser.")
    block_swap: int = Field(
        0, ge=0,
        description="Keep the frozen weights of this many denoiser blocks (the last ones) on the CPU and stream "
        "each in for its forward and backward (transformer families; needs gradient_checkpointing). Saves "
        "device memory, costs host-to-device copies every step. See docs/memory.md.",
    )
    compile: bool | Literal["blocks"] = Field(
        False,
        description="torch.compile the denoiser: true (the whole of it) or 'blocks' (regional: each repeated "
        "block compiled once and shared by its like, minutes less to compile; works with block_swap, gradient "
        "checkpointing, adapters and quantized bases). Slow first steps, faster after (on GPUs; on a CPU it "
        "helps small transformers). Graphs compiled per step are reported.",
    )
    routing: RoutingSection | None = Field(
        None, description="Token routing (TREAD) for flow transformers (flux, sd3): a share of the image tokens "
        "skips the middle blocks in training forwards, for a cheaper step; null: off. See docs/benchmarks.md.",
    )
    optimizer_in_backward: bool = Field(
        False,
        description="Step each trained tensor inside the backward pass as soon as its gradient is complete, and "
        "free that gradient at once: the same result as the ordinary step, with less peak memory (up to the size "
        "of all gradients: full fine-tuning). Needs max_grad_norm: null (clipping needs every gradient first), "
        "no fp16 (bf16 or no) and on_nan: stop; one process. With gradient_accumulation the earlier micro-batches "
        "hold their gradients as usual. See docs/memory.md.",
    )
    channels_last: bool = Field(False, description="Keep U-Net convolutions in channels-last memory format.")
    min_snr_gamma: float | None = Field(
        None, gt=0.0, description="Min-SNR loss weighting gamma (5.0 is usual); null disables."
    )
    noise_offset: float = Field(0.0, ge=0.0, le=1.0, description="Offset noise strength (0.05-0.1 is usual).")
    flow: FlowSection = Field(default_factory=FlowSection, description="Rectified-flow objective options.")
    loss: LossSection = Field(default_factory=LossSection, description="Element loss (MSE, Huber) and weightings.")
    ema: EMASection = Field(default_factory=EMASection, description="EMA of trained parameters.")
    checkpoint_every: int = Field(500, ge=0, description="Save a resumable checkpoint every N steps; 0 disables.")
    keep_last: int = Field(2, ge=1, description="How many checkpoints to keep.")
    resume: Annotated[str, PathRef(names=("latest",))] | None = Field(
        None, description="'latest' (newest complete checkpoint in output_dir) or a checkpoint folder."
    )
    resume_force: bool = Field(
        False, description="Resume even if the recipe or dataset changed since the checkpoint."
    )
    on_nan: Literal["stop", "skip"] = Field(
        "stop", description="Non-finite loss or gradients: stop with an error, or skip the batch."
    )
    max_nan_skips: int = Field(10, ge=1, description="With on_nan: skip, stop after this many skipped batches.")
    barrier_timeout: int = Field(
        1800, ge=10, description="Seconds a process waits for the others at a collective (barrier, gradient "
        "sync) before the run stops with an error; a crashed process stops the others at once anyway."
    )
    overwrite: bool = Field(
        False, description="Allow writing into an output_dir that already holds a finished run."
    )
    keep_best: str | dict[str, float] | None = Field(
        None,
        description="Keep the export of the best validation step beside the last one, in best-step-NNNNNN/: a "
        "metric ('clip_i', 'dino', 'clip_t') or a weighted mix ({clip_i: 0.5, clip_t: 0.5}) of validation.metrics.",
    )

    @field_validator("keep_best", mode="before")
    @classmethod
    def _keep_best(cls, v):
        if v is None:
            return v
        from finetune.errors import did_you_mean

        names = [v] if isinstance(v, str) else list(v) if isinstance(v, dict) else None
        if not names:
            raise ValueError(f"a metric ({', '.join(METRIC_NAMES)}) or a mapping of metric to weight")
        for n in names:
            if n not in METRIC_NAMES:
                raise ValueError(f"unknown metric '{n}'{did_you_mean(n, METRIC_NAMES)}; use {', '.join(METRIC_NAMES)}")
        if isinstance(v, dict) and not all(isinstance(w, int | float) and w > 0 for w in v.values()):
            raise ValueError("weights must be positive numbers, e.g. {clip_i: 0.5, clip_t: 0.5}")
        return v

    @model_validator(mode="after")
    def _combinations(self):
        if self.block_swap and not self.gradient_checkpointing:
            raise ValueError("train.block_swap needs train.gradient_checkpointing: true (without it the graph keeps "
                             "every streamed block on the device until the backward, and nothing is saved)")
        if self.optimizer_in_backward:  # what a step taken inside the backward cannot do exactly
            for bad, key, why in (
                (self.max_grad_norm, "max_grad_norm", "clipping needs the norm of every gradient before the first "
                 "tensor steps: set train.max_grad_norm: null"),
                (self.mixed_precision == "fp16", "mixed_precision", "fp16's loss scaler must see every gradient "
                 "before a step: use bf16 or no"),
                (self.on_nan == "skip", "on_nan", "a step taken inside the backward cannot be dropped afterwards: "
                 "use train.on_nan: stop"),
            ):
                if bad:
                    raise ValueError(f"train.optimizer_in_backward with train.{key}: {why}")
        if self.block_swap and self.compile is True:
            raise ValueError("train.block_swap streams each block's weights from hooks around the block, which a "
                             "whole-denoiser compile would trace; set train.compile: blocks (each block compiled, "
                             "the hooks outside)")
        return self

    @field_validator("resume")
    @classmethod
    def _resume(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must be 'latest', a checkpoint folder, or null")
        return v


class ValidationSection(StrictModel):
    # token and class_word come first: the prompts validator fills prompt sets with them
    token: str | None = Field(
        None,
        description="The trigger token in prompts (e.g. 'sks'): fills '{}' in prompt sets, marks the prompts that "
        "show the subject (clip_i and dino average those) and is dropped from prompts for clip_t.",
    )
    class_word: str | None = Field(None, description="The subject's class noun (e.g. 'dog'), for prompt sets and clip_t.")
    prompts: list[str] = Field(
        default_factory=list,
        description="Prompts rendered into the sample grid, or a shipped evaluation set: 'dreambench' (objects), "
        "'dreambench_live' (animals, people), 'dreambench_toy' (toy world), filled with token and class_word.",
    )
    negative_prompt: str = Field("", description="Negative prompt for every sample.")
    images: list[ImageRef | list[ImageRef]] = Field(
        default_factory=list,
        description="Edit and reference models: the conditioning images of validation pairs, one per prompt (or "
        "one for every prompt; a list where examples carry several): an image path, or 'toy:<colour> <shape>' for "
        "a toy world drawing. With data.control the control image is computed from it as from a target. Each grid "
        "row shows the input, then one output per seed.",
    )
    targets: list[ImageRef | None] = Field(
        default_factory=list,
        description="Edit pairs: the image each prompt's output should look like (path or 'toy:<colour> <shape>'; "
        "null where none), for clip_i / dino against the target instead of the training images.",
    )
    seeds: list[Annotated[int, Field(ge=0, le=2**64 - 1)]] = Field(
        default_factory=lambda: [0, 1], description="One grid column per seed.")
    every: int = Field(0, ge=0, description="Render a grid every N steps (0: only at the start and the end).")
    at_start: bool = Field(True, description="Render the untouched base at step 0 for comparison.")
    base: BaseRef | None = Field(
        None,
        description="Render the grids with this base instead of model.base, the trained adapters applied: the "
        "distilled model a LoRA trained on its undistilled base is for (Z-Image-Turbo for Z-Image, FLUX.2 [klein] "
        "4B for its Base). Same family and layer shapes as model.base; its own steps and guidance unless set here.",
    )
    steps: int | None = Field(
        None, ge=1, le=1000,
        description="Denoising steps per sample; null: the sampling base's own (validation.base, else model.base: "
        "e.g. 4 for FLUX.1 [schnell], 9 for Z-Image-Turbo, 28 for FLUX.1 [dev]), 30 where it publishes none.",
    )
    guidance_scale: float | None = Field(
        None, ge=0.0, le=100.0,
        description="Guidance scale (FLUX [dev]: the distilled guidance); null: the sampling base's own (0 for "
        "step-distilled bases), else the family's usual value (SD 7.5, SD3 7.0, FLUX 3.5).",
    )
    training_adapter: Literal["off", "on", "both"] = Field(
        "off",
        description="With model.training_adapter: render the grids without it (off: what the export does at "
        "inference), with it (on), or both (a second grid, *_with_adapter.png).",
    )
    width: int | None = Field(None, ge=8, multiple_of=8, description="Sample width; default data.resolution.")
    height: int | None = Field(None, ge=8, multiple_of=8, description="Sample height; default data.resolution.")
    frames: int | None = Field(None, ge=1, le=1025, description="Video families: frames per sample clip; default "
                               "data.video.frames.")
    fps: float | None = Field(None, gt=0.0, le=240.0, description="Video families: frame rate of the GIF / MP4 "
                              "written; default data.video.fps, else 16.")
    scheduler: Literal["auto", "ddim", "euler", "euler_a", "dpm++", "pndm", "base"] = Field(
        "auto", description="Sampler for validation images; 'base' uses the base's own sampler; 'auto' the "
        "family's choice (DDIM for SD 1/2/XL, the base's flow-matching sampler for SD3 and FLUX)."
    )
    metrics: list[Literal["clip_i", "clip_t", "dino"]] = Field(
        default_factory=list,
        description="DreamBench metrics of every grid: 'clip_i' and 'dino' (subject fidelity against the reference "
        "images), 'clip_t' (prompt fidelity); logged, kept in samples/metrics.json and plotted in metrics.png.",
    )
    reference_dir: LocalPath | None = Field(
        None, description="Reference images for clip_i/dino; default the first data source's (at most 64, evenly spread)."
    )
    clip_model: EvalModel = Field(
        DEFAULT_CLIP, description="CLIP model for clip_i/clip_t: hub id or folder; 'toy' for the toy base's tiny CLIP."
    )
    dino_model: EvalModel = Field(
        DEFAULT_DINO, description="Self-supervised ViT for dino (ViT or DINOv2): hub id or folder; 'toy' for the toy's."
    )
    score_subject: str | None = Field(
        None,
        description="Toy base only: score every grid with the toy scorer's similarity to this held-out subject "
        "(printed, logged and kept in samples/scores.json).",
    )
    score_clips: bool = Field(
        False, description="Toy video base only: score every clip's colour, shape and motion against its prompt "
        "(finetune/toy/video_score.py; printed and kept in samples/scores.json).",
    )

    @field_validator("score_subject")
    @classmethod
    def _subject(cls, v: str | None) -> str | None:
        if v is not None:
            from finetune.toy.world import SUBJECTS  # numpy + PIL only: cheap enough at recipe time

            if v not in SUBJECTS:
                from finetune.errors import did_you_mean

                raise ValueError(f"unknown toy subject{did_you_mean(v, SUBJECTS)}; choose one of {', '.join(SUBJECTS)}")
        return v

    @field_validator("prompts", mode="before")
    @classmethod
    def _prompt_set(cls, v, info):
        if not isinstance(v, str):
            return v
        from finetune.eval.prompts import expand, prompt_sets  # PyYAML only

        if v not in prompt_sets():
            from finetune.errors import did_you_mean

            raise ValueError(f"not a prompt set{did_you_mean(v, prompt_sets())}; give a list of prompts or one of "
                             f"{', '.join(prompt_sets())}")
        if not info.data.get("class_word"):
            raise ValueError("a prompt set needs validation.class_word (the subject's class noun, e.g. dog)")
        return expand(v, info.data["class_word"], info.data.get("token"))

    @field_validator("metrics")
    @classmethod
    def _metrics_once(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("lists a metric twice")
        return v

    @model_validator(mode="after")
    def _pairs(self):
        for key, items in (("images", self.images), ("targets", self.targets)):
            if items and len(items) not in (1, len(self.prompts)):
                raise ValueError(f"validation.{key}: give one per prompt ({len(self.prompts)}) or one for all "
                                 f"(got {len(items)})")
        if self.targets and not self.images:
            raise ValueError("validation.targets are the outputs of validation pairs: set validation.images too")
        subject = {"clip_i", "dino"} & set(self.metrics)
        if self.images and subject and not any(self.targets):
            raise ValueError(f"{' and '.join(sorted(subject))} score validation pairs against their targets: set "
                             "validation.targets (or keep clip_t only)")
        return self

    @model_validator(mode="after")
    def _metrics_need(self):
        if self.metrics and not self.prompts:
            raise ValueError("metrics score the validation grid: set validation.prompts (or drop validation.metrics)")
        subject = {"clip_i", "dino"} & set(self.metrics)
        if subject and self.token and not any(shows(p, self.token) for p in self.prompts):
            raise ValueError(f"{' and '.join(sorted(subject))} score the prompts that contain validation.token "
                             f"'{self.token}', and none does; add one or change the token")
        return self


ExportFormat = Literal["diffusers", "kohya", "bfl", "nextdit", "a1111", "single_file"]


class ExportSection(StrictModel):
    formats: list[ExportFormat] | None = Field(
        None,
        description="What the run writes: 'diffusers' (peft/diffusers files), 'kohya' (ComfyUI/A1111 LoRA), "
        "'bfl' (FLUX LoRA in Black Forest Labs names: sd-scripts, Forge), 'nextdit' (Lumina 2 LoRA in its original "
        "names, q/k/v fused: ComfyUI, sd-scripts), 'a1111' (A1111/ComfyUI embedding), 'single_file' (a whole model as one original-SD .safetensors); "
        "default: every format the method writes.",
    )
    name: str | None = Field(None, description="File stem for the kohya/A1111 exports; default the run folder's name.")
    dtype: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="dtype of the exported weights.")
    model_card: bool = Field(True, description="Write a README.md model card beside the weights.")
    use_ema: bool = Field(True, description="Export the EMA weights when EMA is enabled.")
    target_base: BaseRef | None = Field(
        None,
        description="The base the export is for, named in the model card (load snippet, sampling settings) and the "
        "metadata (finetune.target_base); null: validation.base, else model.base.",
    )

    @field_validator("formats")
    @classmethod
    def _formats(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError("lists a format twice")
        return v

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        return plain_name(v)  # the name becomes '<output_dir>/<name>.safetensors': it stays in that folder


class LoggingSection(StrictModel):
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"], description="Trackers; [] logs only to the console and loss.png."
    )
    every: int = Field(10, ge=1, description="Log scalars every N steps.")
    project: str = Field("finetune", description="Project name for the trackers.")
    progress: bool = Field(True, description="Show a progress bar.")

    @field_validator("report_to")
    @classmethod
    def _trackers(cls, v: list[str]) -> list[str]:
        # checked here, not at the first log: a missing tracker would drop every metric and then crash the run
        packages = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}
        for tracker in v:
            if not any(_installed(p) for p in packages[tracker]):
                raise ValueError(f"'{tracker}' is not installed; pip install {packages[tracker][0]}, or remove it "
                                 "from logging.report_to ([] logs to the console and loss.png only)")
        return v


def _installed(package: str) -> bool:
    """Whether a package can be imported, without importing it (recipe checks stay fast)."""
    import importlib.util

    return importlib.util.find_spec(package) is not None


def check_memory_options(recipe) -> None:
    """Memory options that do not combine (recipe time; a ValueError naming the key)."""
    if recipe.train.block_swap and recipe.model.quantize in ("nf4", "int8"):
        raise ValueError(f"train.block_swap streams plain (or fp8) weights; with model.quantize: "
                         f"{recipe.model.quantize} the blocks are already small: set train.block_swap: 0 or "
                         "model.quantize: fp8 / none")
