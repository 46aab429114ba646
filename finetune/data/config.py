"""Schema of the recipe's `data:` section: sources, caption rules, buckets, caches.

Pure pydantic, no torch: it is imported while the recipe is validated.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from finetune.sections import HubOrPath, LocalPath, PathRef, StrictModel, plain_name


class CaptionRules(StrictModel):
    template: str = Field(
        "{caption}",
        description="How the training caption is built; '{caption}' is the image's caption, '{trigger}' the trigger word.",
    )
    trigger: str | None = Field(None, description="Trigger word(s) substituted for '{trigger}'.")
    shuffle_tags: bool = Field(False, description="Shuffle comma-separated tags each time an image is seen.")
    keep_tokens: int = Field(0, ge=0, description="Tags at the front that never move or drop when shuffling.")
    separator: str = Field(",", min_length=1, description="Tag separator for shuffling and tag dropout.")
    caption_dropout: float = Field(
        0.0, ge=0.0, le=1.0, description="Probability of training on an empty caption (helps CFG)."
    )
    tag_dropout: float = Field(0.0, ge=0.0, le=1.0, description="Probability of dropping each non-kept tag.")

    @model_validator(mode="after")
    def _template(self):
        if "{trigger}" in self.template and not self.trigger:
            raise ValueError("template uses {trigger} but 'trigger' is not set")
        try:
            self.template.format(caption="", trigger="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"template {self.template!r} has a placeholder other than {{caption}} and {{trigger}} ({e})"
            ) from None
        return self

    @property
    def varies(self) -> bool:
        """True when the same image can get a different caption each time it is seen."""
        return self.shuffle_tags or self.caption_dropout > 0 or self.tag_dropout > 0


class _Source(StrictModel):
    repeats: int = Field(1, ge=1, description="How many times each image is seen per epoch.")
    caption: CaptionRules | None = Field(None, description="Caption rules for this source (default: data.caption).")
    name: str | None = Field(None, description="Label of this subset in summaries; default its path.")
    preserve: bool = Field(
        False, description="A regularisation source: its examples train toward the frozen base's own prediction "
        "(base-prediction preservation, data.preservation) instead of toward the noise.",
    )


class FolderSource(_Source):
    type: Literal["folder"] = "folder"
    path: LocalPath = Field(description="Folder of images with same-stem caption files.")
    caption_ext: str = Field(".txt", description="Extension of caption files.")
    recursive: bool = Field(False, description="Also read sub-folders.")


class MetadataSource(_Source):
    type: Literal["metadata"] = "metadata"
    path: LocalPath = Field(description="Folder holding images and metadata.jsonl or metadata.csv.")
    file: Annotated[str, PathRef(within="source")] | None = Field(None, description="Metadata file name; default metadata.jsonl, then metadata.csv.")
    caption_column: str = Field("text", description="Column holding the caption.")


class KohyaSource(_Source):
    type: Literal["kohya"] = "kohya"
    path: LocalPath = Field(description="Folder of 'N_prompt' sub-folders (kohya layout).")
    caption_ext: str = Field(".txt", description="Extension of sidecar caption files.")


class HFSource(_Source):
    type: Literal["hf"] = "hf"
    path: HubOrPath = Field(description="Dataset name on the hub, a local dataset folder, or a save_to_disk folder.")
    split: str = Field("train", description="Split to read.")
    image_column: str = Field("image", description="Column holding the image.")
    caption_column: str = Field("text", description="Column holding the caption.")
    revision: str | None = Field(None, description="Hub revision.")


class InstanceSource(_Source):
    type: Literal["instance"] = "instance"
    path: LocalPath = Field(description="Folder of subject images (DreamBooth instance images).")
    instance_prompt: str = Field(description="Prompt for every instance image, e.g. 'a photo of sks dog'.")
    caption_ext: str = Field(".txt", description="Optional per-image captions; used instead of the prompt.")


class ToySource(_Source):
    type: Literal["toy"] = "toy"
    subject: str = Field(
        "world", description="'world' for captioned world images, or the name of a held-out toy subject."
    )
    count: int = Field(16, ge=1, le=100_000, description="How many images to draw.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the drawing.")
    prompt: str | None = Field(None, description="Caption for every image; default the world's own captions.")
    variants: bool = Field(
        False, description="World images: caption each with a random short variant ('a blue square', 'blue "
        "square', ...) as the base was trained, instead of the full 'a blue square on a white background'.",
    )

    masks: bool = Field(
        False, description="Give every image its object mask (white on the shape, black elsewhere) for data.masks.",
    )
    edits: list[str] | None = Field(
        None, description="Draw edit pairs instead (with data.conditioning): each record a target, its input image "
        "as conditioning and its instruction as caption, e.g. ['make it red', 'make it a circle'] (finetune/toy/"
        "edits.py), cycling through the instructions.",
    )
    held_out: bool = Field(
        False, description="Edit pairs: draw inputs from what training never shows as an input (a purple object, a "
        "circle) instead of the training inputs.",
    )

    @model_validator(mode="after")
    def _variants(self):
        if self.variants and self.subject != "world":
            raise ValueError("variants applies to subject: world (held-out subjects have one caption form)")
        if self.edits is not None:
            from finetune.toy.edits import parse  # numpy + PIL only

            for i, text in enumerate(self.edits):
                try:
                    parse(text)
                except ValueError as e:
                    raise ValueError(f"edits.{i}: {e}") from None
            if not self.edits or self.subject != "world" or self.masks or self.variants:
                raise ValueError("edits draws pairs of world objects: give at least one instruction, and leave "
                                 "subject, masks and variants out")
        elif self.held_out:
            raise ValueError("held_out applies to edit pairs (set edits)")
        return self


class VideoSource(FolderSource):
    type: Literal["video"] = "video"  # a folder source whose files are videos (mp4, webm, mov, mkv, gif)


class FramesSource(_Source):
    type: Literal["frames"] = "frames"
    path: str = Field(description="Folder of clip folders, each holding its frames as images (sorted by name), "
                      "captioned by '<clip folder>.txt' beside it or 'caption.txt' inside it.")
    fps: float = Field(16.0, gt=0.0, le=240.0, description="The frame rate the frames were taken at.")
    caption_ext: str = Field(".txt", description="Extension of the caption file beside each clip folder.")


class ToyVideoSource(_Source):
    type: Literal["toy_video"] = "toy_video"
    motion: str = Field("world", description="'world' for captioned world clips, or one motion (e.g. 'shrinking', "
                        "held out of the toy video base).")
    count: int = Field(16, ge=1, le=100_000, description="How many clips to draw.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the drawing.")
    prompt: str | None = Field(None, description="Caption for every clip; default the world's own captions.")


Source = Annotated[
    FolderSource | MetadataSource | KohyaSource | HFSource | InstanceSource | ToySource | VideoSource | FramesSource
    | ToyVideoSource,
    Field(discriminator="type"),
]
VIDEO_SOURCES = ("video", "frames", "toy_video")


class VideoSection(StrictModel):
    """Clips for video families (Wan): how many frames, at what rate, and how they are taken from each video."""

    frames: int = Field(81, ge=1, le=1025, description="Frames per clip (Wan: 4k + 1, e.g. 81 = 5 s at 16 fps).")
    fps: float | None = Field(16.0, gt=0.0, le=240.0, description="Frame rate clips are sampled at (Wan trains at "
                              "16); null: each video's own rate.")
    sampling: Literal["head", "uniform", "clips"] = Field(
        "head", description="'head': the first frames; 'uniform': frames spread over the whole video (fps "
        "ignored); 'clips': `clips` clips per video, their starts spread over it.")
    clips: int = Field(1, ge=1, le=64, description="Clips per video (sampling: clips).")
    frame_buckets: list[int] | None = Field(
        None, description="Shorter clip lengths a video too short for `frames` may use (each 4k + 1, e.g. "
        "[17, 33, 49]); null: every video must fill `frames`.")
    max_side: int = Field(4096, ge=64, le=16384, description="Largest video side accepted, in px.")

    @model_validator(mode="after")
    def _buckets(self):
        if self.sampling == "clips" and self.clips < 2:
            raise ValueError("sampling: clips takes several clips per video; set clips: 2 or more (or sampling: head)")
        if self.frame_buckets and max(self.frame_buckets) > self.frames:
            raise ValueError(f"frame_buckets {self.frame_buckets} holds a length above frames {self.frames}")
        return self


class BucketSection(StrictModel):
    enabled: bool = Field(True, description="Group images into aspect-ratio buckets of about resolution^2 pixels.")
    min_side: int | None = Field(
        None, ge=64, multiple_of=64, description="Smallest bucket side in pixels; default resolution/2."
    )
    max_side: int | None = Field(
        None, ge=64, multiple_of=64, description="Largest bucket side in pixels; default resolution*2."
    )
    max_aspect: float = Field(2.0, ge=1.0, le=8.0, description="Largest long/short side ratio.")

    def sides(self, resolution: int) -> tuple[int, int]:
        """(min_side, max_side) with the defaults filled in from the resolution."""
        lo = self.min_side or max(64, resolution // 2 // 64 * 64)
        hi = self.max_side or resolution * 2
        return lo, hi


class PriorSection(StrictModel):
    class_prompt: str = Field(description="Prompt of the class, e.g. 'a photo of a dog'.")
    class_dir: LocalPath = Field(description="Folder of class images; missing ones are generated there.")
    num_class_images: int = Field(100, ge=1, description="How many class images prior preservation uses.")
    loss_weight: float = Field(1.0, ge=0.0, description="Weight of the prior-preservation loss.")
    generate_steps: int = Field(30, ge=1, description="Denoising steps when generating class images.")
    generate_batch_size: int = Field(4, ge=1, description="Batch size when generating class images.")
    guidance_scale: float = Field(7.5, ge=0.0, description="CFG scale when generating class images.")


class PreservationSection(StrictModel):
    """Base-prediction preservation: some examples of each batch train toward what the frozen base (adapters
    switched off) predicts for them, so the adapter learns the subject and leaves the rest of the model alone."""

    share: float = Field(
        0.5, gt=0.0, lt=1.0, description="Share of every batch that is preservation examples (rounded, at least 1)."
    )
    weight: float = Field(1.0, ge=0.0, description="Loss weight of the preservation examples.")
    prompt: str | None = Field(
        None, description="Caption the preservation examples get (e.g. DreamBooth's class prompt 'a dog'); with no "
        "source marked preserve: true they are the instance images under this caption (no class images).",
    )


class MaskSection(StrictModel):
    """Masked loss: per-image masks weight the loss in latent space (white = learn here, black = ignore)."""

    folder: Annotated[str, PathRef(within="image")] = Field(
        "masks", description="Folder of same-stem mask images, relative to each image's own folder (or absolute).",
    )
    alpha: bool = Field(True, description="Use an image's alpha channel as its mask when it has no mask file.")
    unmasked_weight: float = Field(
        0.0, ge=0.0, le=1.0, description="Loss weight of the masked-out (black) area toward the image itself; 0 "
        "ignores the image there.",
    )
    unmasked_target: Literal["none", "base"] = Field(
        "none", description="'base': the masked-out area also trains toward the frozen base's own prediction "
        "(adapters switched off), so the adapter learns the subject and leaves what the base draws around it "
        "alone instead of being free to change it there; 'none': it only counts through unmasked_weight.",
    )
    base_weight: float = Field(
        1.0, ge=0.0, description="Loss weight of the masked-out area toward the base's prediction "
        "(unmasked_target: base).",
    )
    required: bool = Field(False, description="Every image needs a mask (file or alpha); else it trains unmasked.")


class ConditioningSection(StrictModel):
    """Paired data: every record carries conditioning images beside its target (an edit's input image, reference
    photos of a subject, a control map). They travel with the target through buckets, crops, flips and the latent
    cache; the family decides how they enter the denoiser (finetune/models/families)."""

    role: Literal["spatial", "reference"] = Field(
        "spatial", description="'spatial': pixel-aligned with the target (an edit's input, a control map): resized, "
        "cropped and flipped exactly as the target, and must have its aspect ratio; 'reference': a picture of a "
        "subject or style, resized on its own (a centre crop at `resolution`, never flipped).",
    )
    count: int = Field(1, ge=1, le=8, description="Conditioning images per record (several references: 2, 3, ...).")
    resolution: int | None = Field(
        None, ge=64, le=4096, multiple_of=64,
        description="References: the side of their own pixel-area budget (their bucket has the target's aspect "
        "ratio so a batch stacks); default data.resolution. Spatial images always take the target's size.",
    )
    folder: str = Field(
        "control", description="Folder sources: the sub-folder of conditioning images beside `target_folder`, "
        "matched to targets by file stem; with count > 1, '<folder>_1', '<folder>_2', ...",
    )
    target_folder: str = Field("target", description="Folder sources: the sub-folder of target images and captions.")
    column: str = Field(
        "control_image", description="Metadata and hf sources: the column of conditioning images (a path or a list "
        "of paths / images; or '<column>_1', '<column>_2', ... columns).",
    )

    @field_validator("folder", "target_folder")
    @classmethod
    def _sub_folder(cls, v: str) -> str:
        return plain_name(v, "folder name")  # a sub-folder of each folder source: it must not lead out of the dataset

    @model_validator(mode="after")
    def _role(self):
        if self.role == "spatial" and self.resolution is not None:
            raise ValueError("resolution applies to role: reference; spatial images take their target's size "
                             "(remove it, or set role: reference)")
        return self


PAIRED_SOURCES = ("folder", "metadata", "hf", "toy")  # source types that can carry conditioning images


class ControlSection(StrictModel):
    """Control images computed from each target instead of read from files (finetune/data/control.py): made once
    at the scan, then bucketed, cropped, flipped and cached with the target like a control/ folder's images."""

    compute: Literal["canny", "toy_mask"] = Field(
        description="'canny': the target's edges (OpenCV's Canny on the grey image, white on black); 'toy_mask': "
        "the toy world's object mask (white on the shape, black elsewhere: finetune/toy/score.py's foreground).",
    )
    low: int = Field(100, ge=0, le=1000, description="canny: the lower hysteresis threshold.")
    high: int = Field(200, ge=1, le=1000, description="canny: the upper hysteresis threshold.")

    @model_validator(mode="after")
    def _thresholds(self):
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class DataSection(StrictModel):
    sources: list[Source] = Field(min_length=1, description="Image sets to train on (subsets).")
    resolution: int = Field(512, ge=64, le=4096, multiple_of=64, description="Training resolution (side of the pixel-area budget).")
    buckets: BucketSection = Field(default_factory=BucketSection, description="Aspect-ratio bucketing.")
    crop: Literal["center", "random"] = Field("center", description="Crop after resizing to cover the bucket.")
    random_flip: bool = Field(False, description="Flip images horizontally at random.")
    caption: CaptionRules = Field(default_factory=CaptionRules, description="Default caption rules.")
    cache_latents: bool = Field(False, description="Encode images with the VAE once and reuse the latents.")
    cache_text: bool | Literal["auto"] = Field(
        "auto",
        description="Encode captions once and reuse the text-encoder outputs; 'auto' caches where the family's "
        "encoders are large (SD3, FLUX: T5-XXL) and captions never change, then releases the encoders.",
    )
    cache_dir: LocalPath | None = Field(None, description="Cache folder; default <output_dir>/cache.")
    cache_in_memory: bool = Field(False, description="Keep caches in memory instead of on disk.")
    num_workers: int = Field(0, ge=0, le=64, description="DataLoader worker processes.")
    on_bad_image: Literal["error", "skip"] = Field(
        "error", description="A corrupt or unusable image: stop with an error, or skip it with a warning."
    )
    prior: PriorSection | None = Field(None, description="DreamBooth prior preservation (class images).")
    preservation: PreservationSection | None = Field(
        None, description="Base-prediction preservation: regularisation examples train toward the base's prediction.",
    )
    masks: MaskSection | None = Field(None, description="Masked loss from mask files or alpha channels.")
    conditioning: ConditioningSection | None = Field(
        None, description="Paired data: conditioning images (edit inputs, references) beside every target.",
    )
    control: ControlSection | None = Field(
        None, description="Compute each target's control image (canny edges, the toy's masks) instead of pairing "
        "files; needs data.conditioning {count: 1, role: spatial}.",
    )
    video: VideoSection | None = Field(
        None, description="Video clips (video families: Wan): frames per clip, rate, sampling, frame-count "
        "buckets; image sources then train as one-frame clips.")

    @model_validator(mode="after")
    def _rules(self):
        if self.cache_latents and self.crop == "random":
            raise ValueError(
                "cache_latents with crop: random would freeze one crop forever; use crop: center or turn caching off"
            )
        lo, hi = self.buckets.sides(self.resolution)
        if lo > hi:
            raise ValueError(f"buckets.min_side {lo} is larger than buckets.max_side {hi}")
        if lo > self.resolution or hi < self.resolution:
            raise ValueError(
                f"buckets.min_side {lo} .. max_side {hi} must include the resolution {self.resolution}"
            )
        self._check_preservation()
        self._check_conditioning()
        self._check_video()
        return self

    def _check_conditioning(self) -> None:
        c = self.conditioning
        if self.control is not None and (c is None or c.count != 1 or c.role != "spatial"):
            raise ValueError("data.control computes one control image per target: set data.conditioning: "
                             "{count: 1, role: spatial}")
        if c is None:
            return
        for i, src in enumerate(self.sources):
            if src.type not in PAIRED_SOURCES:
                raise ValueError(f"data.sources.{i}: type '{src.type}' has no paired layout for data.conditioning; "
                                 f"use one of {', '.join(PAIRED_SOURCES)} (a folder with target/ and control/)")
        if self.prior is not None or self.masks is not None:
            key = "data.prior" if self.prior is not None else "data.masks"
            raise ValueError(f"{key} is not supported with data.conditioning yet; remove one of them")
        if self.video is not None:
            raise ValueError("data.conditioning with data.video (video edits, references for clips) is not "
                             "supported yet; remove one of them")

    def _check_video(self) -> None:
        clips = [i for i, s in enumerate(self.sources) if s.type in VIDEO_SOURCES]
        if clips and self.video is None:
            raise ValueError(f"data.sources.{clips[0]} is a {self.sources[clips[0]].type} source; add a data.video "
                             "section (frames, fps) to take clips from it")
        if self.video is not None and self.masks is not None:
            raise ValueError("data.masks is for images; video clips train unmasked: remove data.masks")
        if self.video is not None and (self.prior is not None or self.preservation is not None):
            raise ValueError("data.video: prior / base-prediction preservation with clips is not supported yet; "
                             "remove data.prior and data.preservation")

    def _check_preservation(self) -> None:
        marked = [i for i, s in enumerate(self.sources) if s.preserve]
        p = self.preservation
        if marked and p is None:
            raise ValueError(f"data.sources.{marked[0]}.preserve needs a data.preservation section (share, weight)")
        if p is None:
            return
        if self.prior is not None:
            raise ValueError("data.preservation and data.prior both regularise: use one (data.preservation needs "
                             "no class images; its prompt can be the class prompt)")
        if not marked and not p.prompt:
            raise ValueError("data.preservation: mark a regularisation source 'preserve: true', or set "
                             "data.preservation.prompt to re-caption the instance images (e.g. 'a dog')")
        if len(marked) == len(self.sources):
            raise ValueError("data.sources: every source is preserve: true; leave at least one source to learn from")

    def caption_rules(self, source) -> CaptionRules:
        return source.caption or self.caption
