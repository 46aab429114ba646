"""Qwen-Image-Edit (`qwen_image_edit`) and Edit-2509 / Edit-2511 (`qwen_image_edit_plus`): Qwen-Image's MMDiT
trained to edit, driven exactly as `QwenImageEditPipeline` / `QwenImageEditPlusPipeline` drive it:

- text: the edit system prompt around the instruction, encoded by Qwen2.5-VL *with the input images* (the
  pipeline's processor turns each into vision tokens); the last hidden state without the first 64 tokens
  (`prompt_template_encode_start_idx`), padded to the batch's longest with its mask (padding is masked out of the
  joint attention). Edit-2509 / 2511 name the images ('Picture 1: ...') and see them at ~384x384 px
  (CONDITION_IMAGE_SIZE); the first Edit sees the image at the size its VAE reads it;
- references: each conditioning image's latents (Qwen-Image's VAE and normalisation) packed in 2x2 patches and
  appended to the target's tokens; `img_shapes` lists the target's grid, then each reference's. The prediction
  keeps the target's tokens, so the loss is the target's only. Edit-2511 (`zero_cond_t` in its transformer
  config) gives the references timestep 0 inside the transformer: nothing changes here;
- timestep, objective and sampling (true CFG with a negative prompt) are Qwen-Image's.

An Edit base is told from Qwen-Image by its pipeline class (model_index.json). LoRA files use Qwen-Image's key
names (ComfyUI loads the edit models as QwenImage with reference latents).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from finetune.models.families.qwen_image import QWEN_IMAGE, QwenImageFamily

if TYPE_CHECKING:
    import torch

# QwenImageEditPipeline.prompt_template_encode / QwenImageEditPlusPipeline's (tests compare them with a pipeline's)
SYSTEM = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
          "background), then explain how the user's text instruction should alter or modify the image. Generate a "
          "new image that meets the user's requirements while maintaining consistency with the original input where "
          "appropriate.<|im_end|>\n<|im_start|>user\n")
VISION = "<|vision_start|><|image_pad|><|vision_end|>"
TEMPLATE_EDIT = SYSTEM + VISION + "{}<|im_end|>\n<|im_start|>assistant\n"
TEMPLATE_PLUS = SYSTEM + "{}<|im_end|>\n<|im_start|>assistant\n"
PICTURE = "Picture {}: " + VISION  # Edit-2509 / 2511: each image named before the instruction
DROP = 64  # prompt_template_encode_start_idx


@dataclass(frozen=True)
class QwenImageEditFamily(QwenImageFamily):
    #: Edit-2509 / 2511: several named images, seen by the text encoder at ~384x384 px
    plus: bool = False

    def matches(self, model_index, denoiser_config, text_encoder_config) -> bool:
        return model_index.get("_class_name") == self.pipeline_class and super().matches(
            model_index, denoiser_config, text_encoder_config)

    def encode_prompt(self, comps, captions: list[str], device: Any) -> dict[str, torch.Tensor]:
        return self.encode_conditioned_prompt(comps, captions, None, device)

    def encode_conditioned_prompt(self, comps, captions, images, device) -> dict[str, torch.Tensor]:
        from diffusers import QwenImageEditPlusPipeline

        pictures = self.condition_images(comps, images) if images else [[] for _ in captions]
        texts = [self.template(len(p)).format(c) for c, p in zip(captions, pictures, strict=True)]
        processor = comps.parts["processor"]
        flat = [im for p in pictures for im in p]
        inputs = processor(text=texts, images=flat or None, padding=True, return_tensors="pt").to(device)
        lm = getattr(comps.encoder("text_encoder"), "model", comps.encoder("text_encoder"))
        hidden = lm(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
                    output_hidden_states=True).hidden_states[-1]
        # the pipeline's own helper: each prompt's valid states (whatever side the tokenizer pads), then the drop
        parts = [h[DROP:] for h in QwenImageEditPlusPipeline._extract_masked_hidden(None, hidden,
                                                                                    inputs["attention_mask"])]
        return _right_padded(parts)

    def template(self, n_images: int) -> str:
        if not self.plus:
            return TEMPLATE_EDIT
        return TEMPLATE_PLUS.replace("{}", "".join(PICTURE.format(i + 1) for i in range(n_images)) + "{}")

    def condition_images(self, comps, images: list[torch.Tensor]) -> list[list]:
        """Each example's conditioning images as the text encoder sees them: PIL, resized as the pipeline does
        (Edit-2509 / 2511: to ~384x384 px; Edit: to ~1024x1024 px, the size its VAE reads)."""
        from diffusers.image_processor import VaeImageProcessor
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
            CONDITION_IMAGE_SIZE,
            VAE_IMAGE_SIZE,
            calculate_dimensions,
        )

        scale = 2 ** len(comps.vae.temperal_downsample)
        resize = VaeImageProcessor(vae_scale_factor=scale * 2).resize
        area = CONDITION_IMAGE_SIZE if self.plus else VAE_IMAGE_SIZE
        as_pil = [VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy((g.float() / 2 + 0.5).clamp(0, 1)))
                  for g in images]  # the training pixels came from 8-bit images: the round trip is exact
        out = []
        for pil in zip(*as_pil, strict=True):
            sized = []
            for im in pil:
                w, h = calculate_dimensions(area, im.width / im.height)
                sized.append(resize(im, h, w))
            out.append(sized)
        return out

    def load_component(self, name: str, where: str, revision: str | None = None):
        """The pipeline's processor, loaded without the video processor transformers pairs with it (that one
        needs torchvision, which has no CPU build here; the edit pipelines only hand it images)."""
        return image_processor_only().from_pretrained(where, subfolder=name, revision=revision) \
            if name == "processor" else None

    def pipeline_prompt_kwargs(self, text, negative) -> dict[str, Any]:
        kwargs = super().pipeline_prompt_kwargs(text, negative)
        kwargs.pop("max_sequence_length")  # the edit pipelines read the embeddings' own length
        return kwargs

    def edit_kwargs(self, images, size) -> dict[str, Any]:
        return {"image": list(images) if self.plus else images[0]}

    def predict(self, denoiser, noisy, timesteps, text, batch) -> torch.Tensor:
        import torch
        from diffusers import QwenImageEditPlusPipeline as Pipe

        b, c, h, w = noisy.shape
        refs = batch.get("references") or []
        tokens = [Pipe._pack_latents(noisy, b, c, h, w)]
        tokens += [Pipe._pack_latents(r.to(noisy.dtype), b, c, *r.shape[-2:]) for r in refs]
        shapes = [[(1, h // 2, w // 2), *[(1, r.shape[-2] // 2, r.shape[-1] // 2) for r in refs]]] * b
        out = denoiser(hidden_states=torch.cat(tokens, dim=1), timestep=timesteps / 1000,
                       encoder_hidden_states=text["prompt_embeds"],
                       encoder_hidden_states_mask=text["prompt_embeds_mask"].bool(), img_shapes=shapes,
                       return_dict=False)[0]
        # the target's tokens only; vae_scale_factor 1: _unpack_latents takes latent sizes, returns one frame
        return Pipe._unpack_latents(out[:, : tokens[0].shape[1]], h, w, 1).squeeze(2)

    def check_recipe(self, recipe) -> None:
        super().check_recipe(recipe)
        if recipe.data.conditioning is None:
            raise ValueError(f"data.conditioning: a {self.name} base trains on edit pairs (a target and its input "
                             "image); add data.conditioning and the pairs")


_PROCESSOR: list = []


def image_processor_only():
    """Qwen2VLProcessor with its image processor and tokenizer only: what Qwen-Image-Edit's pipelines use of it
    (text with image placeholders, images), loadable where torchvision (its video processor's need) is absent."""
    if not _PROCESSOR:
        from transformers import Qwen2VLProcessor

        class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
            def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
                super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

        _PROCESSOR.append(ImageOnlyQwen2VLProcessor)
    return _PROCESSOR[0]


def _right_padded(parts: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Prompts of different lengths, right-padded with zeros to the longest, and their mask."""
    import torch

    longest = max(p.shape[0] for p in parts)
    embeds = torch.stack([torch.cat([p, p.new_zeros(longest - p.shape[0], p.shape[1])]) for p in parts])
    mask = torch.stack([torch.arange(longest, device=p.device) < p.shape[0] for p in parts]).long()
    return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}


def _edit_family(name: str, pipeline: str, plus: bool, max_conditions: int) -> QwenImageEditFamily:
    base = {f.name: getattr(QWEN_IMAGE, f.name) for f in fields(QWEN_IMAGE)}
    return QwenImageEditFamily(**{
        **base, "name": name, "pipeline_class": pipeline, "edit_pipeline_class": pipeline, "plus": plus,
        "max_conditions": max_conditions, "prompt_reads_conditions": True, "extra_parts": ("processor",),
        "modelspec_arch": {"flow": name.replace("_", "-")}, "priority": QWEN_IMAGE.priority + 10,
    })


# the first Edit takes one image; Edit-2509 / 2511 are trained for one to three (their model cards)
QWEN_IMAGE_EDIT = _edit_family("qwen_image_edit", "QwenImageEditPipeline", False, 1)
QWEN_IMAGE_EDIT_PLUS = _edit_family("qwen_image_edit_plus", "QwenImageEditPlusPipeline", True, 3)
