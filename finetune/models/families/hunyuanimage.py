"""HunyuanImage 2.1 (Tencent, 17B): a FLUX-shaped MMDiT (`HunyuanImageTransformer2DModel`: 20 double- and 40
single-stream blocks, 3584 wide, patch 1) on a 32x-compressing 64-channel VAE, conditioned by two frozen text
encoders, trained with rectified flow and driven as `HunyuanImagePipeline` drives it:

- text: the pipeline's own `encode_prompt`, called on a text-only pipeline: Qwen2.5-VL-7B reads the caption in
  the pipeline's template, padded to `max_sequence_length` (1000, the pipeline's fixed length) + 34 template
  tokens, of which the third-to-last hidden state is kept without those 34 (`prompt_embeds`, with its mask);
- glyphs: the text in quotes ('...', "...", and the Chinese quotes) becomes `Text "...". ` and goes through the
  byT5 glyph encoder (a T5 encoder over bytes, 128 tokens): `prompt_embeds_2` and its mask. A caption without
  quotes gets zeros and an all-zero mask, which the transformer moves behind the Qwen tokens and never attends to;
- latents: the VAE's mode times `scaling_factor` (no shift; the pipeline divides by it before decoding), patch 1;
- timestep: sigma * 1000 as is; the output is the flow velocity (noise - x0), stepped by the Euler scheduler.

The glyph encoder, a decision: it is a second frozen text encoder, run exactly as the pipeline runs it, per caption,
and cached with the text (both states and both masks). It is never trained (byT5-small, fine-tuned by Tencent for
glyphs: a LoRA on it is refused with the other text encoder, `method.text_encoder`), and it cannot be dropped: a
caption with quoted text would otherwise train on states the pipeline never produces. The transformer's own
glyph projection (`context_embedder_2`) is part of the denoiser and stays frozen under the presets (`full` trains
it); tests/test_hunyuanimage.py shows the glyph states reach the prediction only through their mask.

Objective: uniform timesteps on the flow grid statically shifted by the base's scheduler (`shift`; 5.0 for the base
in sd-scripts' HunyuanImage guide, `--discrete_flow_shift 5.0`, default sampling `sigma`: uniform on that grid), the
grid the pipeline samples with (it hands the scheduler sigmas 1 -> 0, which it shifts). HunyuanImage's authors
published no training code I could read.

Bases: the base model only. The distilled checkpoint (guidance embedding and MeanFlow's second timestep) has no
published training objective, and the refiner (HunyuanImageRefinerPipeline, a latent-conditioned transformer of the
same class) is another model: both are refused in one line. Guidance: the base samples with the adaptive projected
mix guider it ships (`guider`; `ocr_guider` for prompts with quoted text), whose scale validation sets.

LoRA in the stock pipeline: HunyuanImagePipeline has no LoRA loader in diffusers 0.42.1, but the transformer is a
PeftAdapterMixin model: `pipe.transformer.load_lora_adapter("out", weight_name="pytorch_lora_weights.safetensors",
prefix="transformer")` loads the diffusers file with alpha and rank from its header (named by `weight_name`: given
the file's path alone, diffusers 0.42.1 skips the header and takes alpha = rank). ComfyUI: its HunyuanImage21 model
is its HunyuanVideo model, built from FLUX's layers, so its weights carry FLUX's original names
(`double_blocks.0.img_attn.qkv`, `img_mlp.0`, `img_mod.lin`, `single_blocks.0.linear1`, ...); comfy/lora.py has no
diffusers map for it, only the generic `lora_unet_<weight name>` keys every model gets. The 'bfl' form
(finetune/models/families/flux_bfl.py: q/k/v fused exactly, `.alpha` per module) writes those keys, as sd-scripts'
HunyuanImage LoRAs are named; 'kohya' writes diffusers names (`lora_transformer_*`) only this project's converter
reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finetune.export.layouts import TRANSFORMER_WORDS, ModuleNames
from finetune.models.family import Family, llm_flow_transformer
from finetune.models.sampling import Sampling

if TYPE_CHECKING:
    import torch

ENCODERS = ("text_encoder", "text_encoder_2")  # Qwen2.5-VL, byT5
TOKENIZERS = ("tokenizer", "tokenizer_2")
MASK, MASK_2 = "prompt_embeds_mask", "prompt_embeds_mask_2"

DOUBLE = r"transformer_blocks\.\d+\."
SINGLE = r"single_transformer_blocks\.\d+\."
JOINT = r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
# regexes peft full-matches: the token refiner in front of the blocks has attention of the same names, which they
# leave out, as they leave out the transformer's final proj_out
HUNYUANIMAGE_PRESETS: dict[str, list[str] | str] = {
    # both streams' attention in the double blocks and the single blocks' q/k/v (the single blocks fold the
    # attention output into proj_out): FLUX's attention preset, the same module names
    "attention": rf"{DOUBLE}{JOINT}|{SINGLE}attn\.(to_q|to_k|to_v)",
    # + both streams' MLPs and the single blocks' MLP input and fused output: every attention and MLP linear
    "all_linear": rf"{DOUBLE}({JOINT}|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))"
                  rf"|{SINGLE}(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out)",
    # + the modulation linears: every Linear of every double and single block, what sd-scripts' HunyuanImage LoRA
    # (networks/lora_hunyuan_image.py: all Linear layers of DoubleStreamBlock and SingleStreamBlock) trains
    "all_linear_mod": rf"{DOUBLE}({JOINT}|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|norm1\.linear"
                      rf"|norm1_context\.linear)|{SINGLE}(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out|norm\.linear)",
}
HUNYUANIMAGE_WORDS = TRANSFORMER_WORDS + ("context_embedder_2", "token_refiner", "refiner_blocks",
                                          "time_guidance_embed")


@dataclass(frozen=True)
class HunyuanImageFamily(Family):
    def matches(self, model_index, denoiser_config, text_encoder_config) -> bool:
        """The transformer class in a HunyuanImagePipeline folder: the refiner's pipeline shares the class."""
        return super().matches(model_index, denoiser_config, text_encoder_config) \
            and model_index.get("_class_name", self.pipeline_class) == self.pipeline_class

    def check_recipe(self, recipe) -> None:
        super().check_recipe(recipe)
        base = getattr(recipe, "base", None)
        config = getattr(base, "folder", None) and base.folder / "transformer" / "config.json"
        if config and config.is_file():
            c = json.loads(config.read_text())
            if c.get("guidance_embeds") or c.get("use_meanflow"):
                raise ValueError(f"model.base: '{base.name}' is HunyuanImage 2.1 Distilled (guidance-distilled, "
                                 "MeanFlow), whose training objective is not published: train the base model "
                                 "(hunyuanvideo-community/HunyuanImage-2.1-Diffusers) instead")

    def text_only_pipeline(self, comps, length: int | None):
        from diffusers import HunyuanImagePipeline

        parts = {n: comps.encoder(n) for n in ENCODERS}
        parts |= {t: comps.tokenizer_for(n) for n, t in zip(ENCODERS, TOKENIZERS, strict=True)}
        pipe = HunyuanImagePipeline(scheduler=None, vae=None, transformer=None, **parts)
        if length is not None:
            pipe.tokenizer_max_length = length  # a pipeline attribute (1000), not an argument of encode_prompt
        return pipe

    def encode_prompt(self, comps, captions: list[str], device: Any) -> dict[str, torch.Tensor]:
        pipe = self.text_only_pipeline(comps, self.sequence_length(comps))
        embeds, mask, glyphs, glyph_mask = pipe.encode_prompt(list(captions), device=device, batch_size=len(captions))
        return {"prompt_embeds": embeds, MASK: mask, "prompt_embeds_2": glyphs, MASK_2: glyph_mask}

    def pipeline_prompt_kwargs(self, text, negative) -> dict[str, Any]:
        kwargs = super().pipeline_prompt_kwargs(text, negative)
        for prefix, part in (("", text), ("negative_", negative)):
            if part is not None:
                kwargs[f"{prefix}prompt_embeds_2"] = part["prompt_embeds_2"]
        return kwargs

    def guidance_kwargs(self, pipe, scale: float | None) -> dict[str, Any]:
        """The base's guiders carry the scale (the pipeline takes none): validation's scale replaces theirs."""
        if scale is not None:
            for name in ("guider", "ocr_guider"):
                guider = getattr(pipe, name, None)
                if guider is not None and hasattr(guider, "new"):
                    setattr(pipe, name, guider.new(guidance_scale=scale))
        return {}

    def predict(self, denoiser, noisy, timesteps, text, batch) -> torch.Tensor:
        d = noisy.device
        return denoiser(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=text["prompt_embeds"],
                        encoder_attention_mask=text[MASK].to(d), encoder_hidden_states_2=text["prompt_embeds_2"],
                        encoder_attention_mask_2=text[MASK_2].to(d), return_dict=False)[0]


HUNYUANIMAGE = HunyuanImageFamily("hunyuanimage", **llm_flow_transformer(
    pipeline_class="HunyuanImagePipeline",
    denoiser_class="HunyuanImageTransformer2DModel",
    text_encoder_names=ENCODERS,
    tokenizer_names=TOKENIZERS,
    # uniform on the base's statically shifted grid (shift 5.0): sd-scripts' HunyuanImage defaults
    flow_defaults={"sampling": "uniform", "resolution_shift": False},
    patch_size=1,
    max_sequence_length=1000,  # HunyuanImagePipeline.tokenizer_max_length (Qwen tokens after the template)
    kohya_names={"transformer": ModuleNames("lora_transformer", words=HUNYUANIMAGE_WORDS)},
    lora_layouts={"bfl": "finetune.models.families.flux_bfl"},  # ComfyUI's names (see the docstring)
    extra_parts=("guider", "ocr_guider"),  # the base's guiders, kept for validation's pipeline
    base_version="hunyuanimage",
    modelspec_arch={"flow": "hunyuan-image-2.1"},
    lora_presets=HUNYUANIMAGE_PRESETS,
    text_masks={MASK: "long", MASK_2: "long"},  # the transformer reorders valid tokens first by them
    # the CFG scale reported for the base (a ComfyUI scheduler pack's HunyuanImage 2.1 profile: 50 steps, 3.5);
    # not read from the published guider config, which is not on this machine
    default_guidance=3.5,
    frozen_text_encoder="Qwen2.5-VL-7B and the byT5 glyph encoder",
    sampling=Sampling(50, 3.5, what="HunyuanImage 2.1"),  # the pipeline's 50 steps
))
