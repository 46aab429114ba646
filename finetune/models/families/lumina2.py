"""Lumina-Image 2.0 (Alpha-VLLM): a 2.6B single-stream Next-DiT (`Lumina2Transformer2DModel`: 26 joint layers
after 2 context and 2 noise refiners, 2304 wide, 24 query heads over 8 key/value heads) trained with rectified
flow, driven as `Lumina2Pipeline` drives it:

- text: the pipeline's system prompt, ' <Prompt Start> ', then the caption, tokenized by Gemma's tokenizer with
  right padding to `max_sequence_length` (256, the pipeline's default); Gemma-2-2B's second-to-last hidden state
  with the tokenizer's mask. The transformer reads the mask's sum as each caption's length (captions first,
  padding after), so the mask travels with the states (`prompt_attention_mask`);
- latents: FLUX.1's 16-channel VAE, `(z - shift_factor) * scaling_factor`; the transformer patches 2x2 itself;
- time runs the other way (as in Z-Image, which grew out of it): the transformer is given 1 - sigma and predicts
  image minus noise (the pipeline negates it before the Euler step); `predict` returns the flow target's sign.

Guidance: real classifier-free guidance (4.0 in the pipeline, with its CFG renormalisation), not distilled: LoRAs
train on the plain text-conditioned flow loss. The pipeline encodes its negative prompt without the system
prompt; with cached text, validation's negative is encoded as training encodes an empty caption (with it).

ComfyUI loads Lumina 2 as its `Lumina2` model (original names: a fused `attention.qkv`, `attention.out`,
`feed_forward.w1/w2/w3`). comfy/lora.py maps diffusers-style LoRA keys onto it through `z_image_to_diffusers`,
which spells the modules as Z-Image's diffusers model does (`attention.to_q`, `feed_forward.w1`) and slices q, k
and v out of the fused weight at the full width each. `ComfyNames` writes those spellings ('lycoris_...', the
'kohya' format). Lumina 2's keys and values are a third of that width (8 of 24 heads): ComfyUI's slice would run
past the weight, so an adapter on `to_k` / `to_v` is refused in that form (one line). The 'nextdit' format
(lumina2_nextdit.py) holds every module: ComfyUI's own weight names ('lora_unet_layers_0_attention_qkv', which
comfy/lora.py maps for any model), q/k/v fused exactly, as sd-scripts writes Lumina 2 LoRAs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from finetune.errors import ModelError
from finetune.export.layouts import ModuleNames
from finetune.models.family import Family, llm_flow_transformer
from finetune.models.sampling import Sampling

if TYPE_CHECKING:
    import torch

MASK = "prompt_attention_mask"
PROMPT_START = " <Prompt Start> "  # Lumina2Pipeline.encode_prompt: system prompt + this + caption

ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]
LUMINA2_PRESETS: dict[str, list[str] | str] = {
    # diffusers' Lumina 2 LoRA script default (to_q, to_k, to_v, to_out.0) in every block, refiners included
    "attention": ATTENTION,
    # + the SwiGLU feed-forward (linear_1 gate, linear_3 up, linear_2 down): sd-scripts' lora_lumina attn + mlp
    "attention_mlp": ATTENTION + ["feed_forward.linear_1", "feed_forward.linear_2", "feed_forward.linear_3"],
}

# diffusers' Lumina 2 names -> the names ComfyUI's Lumina2 LoRA map (z_image_to_diffusers) reads
COMFY_RENAMES = (("attn.", "attention."), ("feed_forward.linear_1", "feed_forward.w1"),
                 ("feed_forward.linear_2", "feed_forward.w2"), ("feed_forward.linear_3", "feed_forward.w3"))
COMFY_WORDS = ("noise_refiner", "context_refiner", "feed_forward", "to_q", "to_k", "to_v", "to_out")


@dataclass(frozen=True)
class ComfyNames(ModuleNames):
    """'lycoris_<module>' with the module spelled as ComfyUI's Lumina2 map reads it. `grouped`: the model's keys
    and values are narrower than its queries (grouped-query attention), which that map cannot place: their
    adapters are refused in this form, in one line. Every published Lumina 2 is grouped, so a file converted
    without its model is taken as grouped; `bind` to a model reads its config."""

    grouped: bool = True

    def to_ui(self, path: str) -> str:
        if self.grouped and path.endswith(("attn.to_k", "attn.to_v")):
            raise ModelError(f"'{path}': ComfyUI's Lumina 2 LoRA map slices k and v out of the fused qkv weight at the "
                             "full width, and this model's keys / values are narrower (grouped-query attention); "
                             "export the 'nextdit' form (ComfyUI's own names, q/k/v fused) instead")
        for ours, theirs in COMFY_RENAMES:
            path = path.replace(ours, theirs)
        return path

    def from_ui(self, dotted: str) -> str | None:
        for ours, theirs in COMFY_RENAMES:
            dotted = dotted.replace(theirs, ours)
        return dotted

    def bind(self, module=None, meta=None) -> ComfyNames:
        config = getattr(module, "config", None)
        if config is None or "num_kv_heads" not in config:
            return self
        return replace(self, grouped=(config.num_kv_heads or config.num_attention_heads) < config.num_attention_heads)


def reaches_keys_or_values(targets: list[str] | str) -> bool:
    """Whether LoRA targets (suffixes, or one regex peft full-matches) adapt a block's to_k or to_v."""
    import re

    if isinstance(targets, str):
        return any(re.fullmatch(targets, f"layers.0.attn.to_{x}") for x in "kv")
    return any(t.endswith((f"to_{x}", f"attn.to_{x}")) for t in targets for x in "kv")


@dataclass(frozen=True)
class Lumina2Family(Family):
    def encode_prompt(self, comps, captions: list[str], device: Any) -> dict[str, torch.Tensor]:
        tok, encoder = comps.tokenizer_for("text_encoder"), comps.encoder("text_encoder")
        system = system_prompt()
        inputs = tok([system + PROMPT_START + c for c in captions], padding="max_length",
                     max_length=self.sequence_length(comps), truncation=True, return_tensors="pt",
                     padding_side="right")  # the pipeline sets right padding: captions first, then padding
        mask = inputs.attention_mask.to(device)
        hidden = encoder(inputs.input_ids.to(device), attention_mask=mask, output_hidden_states=True).hidden_states
        return {"prompt_embeds": hidden[-2], MASK: mask}

    def check_recipe(self, recipe) -> None:
        super().check_recipe(recipe)
        method = recipe.method
        if "kohya" in (recipe.export.formats or []) and hasattr(method, "denoiser_targets") \
                and reaches_keys_or_values(method.denoiser_targets(self)):
            raise ValueError("export.formats: 'kohya' (ComfyUI) cannot hold Lumina 2's to_k / to_v adapters (its "
                             "keys and values are grouped, and ComfyUI's map slices them at the full width): export "
                             "'nextdit' for ComfyUI (its own names, q/k/v fused) instead of 'kohya'")

    def predict(self, denoiser, noisy, timesteps, text, batch) -> torch.Tensor:
        import torch

        mask = text[MASK]
        # the transformer reads each caption's length from the mask; the memory estimate runs on the meta
        # device, where none can be read: it gets the longest caption (every token kept)
        mask = torch.ones(mask.shape, dtype=torch.long) if mask.is_meta else mask.to(noisy.device).long()
        t = 1 - timesteps / 1000  # Lumina2Pipeline: 1 - t / num_train_timesteps, t = sigma * 1000
        out = denoiser(hidden_states=noisy, timestep=t, encoder_hidden_states=text["prompt_embeds"],
                       encoder_attention_mask=mask, return_dict=False)[0]
        return -out  # the model predicts x0 - noise; the flow target is noise - x0


@functools.cache
def system_prompt() -> str:
    """The system prompt Lumina2Pipeline prepends: its constructor sets it, so ask an empty pipeline."""
    from diffusers import Lumina2Pipeline

    return Lumina2Pipeline(transformer=None, scheduler=None, vae=None, text_encoder=None, tokenizer=None).system_prompt


LUMINA2 = Lumina2Family("lumina2", **llm_flow_transformer(
    pipeline_class="Lumina2Pipeline",
    denoiser_class="Lumina2Transformer2DModel",
    # logit-normal sigmas shifted by resolution with FLUX.1's rule (mu 0.5 at 256 tokens to 1.15 at 4096):
    # sd-scripts' recommended 'nextdit_shift' for Lumina 2, and the mu Lumina2Pipeline computes (its scheduler
    # config keeps FLUX's defaults); diffusers' script draws uniformly on the statically shifted grid instead
    flow_defaults={"sampling": "logit_normal", "resolution_shift": True},
    patch_size=2,
    max_sequence_length=256,  # Lumina2Pipeline's and sd-scripts' default Gemma length
    kohya_names={"transformer": ComfyNames("lycoris", words=COMFY_WORDS)},
    lora_layouts={"nextdit": "finetune.models.families.lumina2_nextdit"},
    base_version="lumina2",
    modelspec_arch={"flow": "lumina-image-2"},
    lora_presets=LUMINA2_PRESETS,
    text_masks={MASK: "long"},  # the transformer counts each caption's tokens from it
    default_guidance=4.0,  # Lumina2Pipeline's guidance_scale (real CFG, renormalised)
    frozen_text_encoder="Gemma-2-2B",
    # the model card's example: 50 steps at guidance 4.0 (the pipeline's own default is 30 steps)
    sampling=Sampling(50, 4.0, what="Lumina-Image 2.0"),
))
