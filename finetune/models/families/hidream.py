"""HiDream-I1 (HiDream.ai, 17B; Full / Dev / Fast): a sparse DiT (`HiDreamImageTransformer2DModel`: 16 double- and
32 single-stream blocks whose image feed-forward is a mixture of experts) conditioned by four frozen text
encoders, trained with rectified flow and driven as `HiDreamImagePipeline` drives it:

- text: the pipeline's own `encode_prompt`, called on a text-only pipeline: the pooled outputs of two CLIPs
  (L and G, concatenated), T5-XXL's states and every hidden layer of Llama-3.1-8B-Instruct (the transformer
  reads the layers its config names, `llama_layers`). The Llama states come layer-first; they are kept
  batch-first (`llama_embeds`) so cached captions stack, and turned back for the transformer;
- latents: FLUX.1's 16-channel VAE, `(z - shift_factor) * scaling_factor`; the transformer patches 2x2 itself;
- timestep: t (sigma * 1000) as is; the transformer predicts x0 - noise (the pipeline negates it), `predict`
  returns the flow target's sign.

Objective: logit-normal sigmas on the grid statically shifted by the base's sampler (3.0: `shift`, or UniPC's
`flow_shift` for the published Full model), as Sana and SD3 train; diffusers' HiDream script samples uniformly on
the same grid.

Mixture of experts, a decision: each image feed-forward (`ff_i`) has a shared expert every token passes and routed
experts a gate picks two of per token (`MoEGate`, a bare parameter peft cannot adapt). diffusers runs the routed
experts through `moe_infer` under `torch.no_grad()` whenever the model is not in train mode, and the trainer
keeps an adapted denoiser's base in the eval mode `from_pretrained` leaves it in (no dropout, the gate's auxiliary
loss off): adapters on routed experts would get no gradient and never learn (diffusers' own HiDream script loads
with `force_inference_output`, which takes the same path). `full` trains the whole model in train mode, its
authors' MoE training path (routed experts and the gate's auxiliary loss included). So the presets adapt the attention, the shared
expert and the text stream's feed-forward, which every token passes, and the routing the base learned stays as
it was; targets that reach a routed expert are refused in one line (tests/test_hidream.py shows the missing
gradients).

Guidance: real CFG (5.0 in the pipeline) for Full; Dev and Fast are guidance-distilled (0.0). ComfyUI: its
HiDream model's LoRA map (comfy/lora.py) is not among the sources I could read, so no UI key table is claimed;
the exports are the diffusers file (and a kohya file of diffusers names for this project's converter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finetune.export.layouts import TRANSFORMER_WORDS, ModuleNames
from finetune.models.families.sana import SanaFamily
from finetune.models.family import Family, llm_flow_transformer
from finetune.models.sampling import Sampling

if TYPE_CHECKING:
    import torch

ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4")
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3", "tokenizer_4")

ATTENTION = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out",  # both streams' attention; the text
             "attn1.to_q_t", "attn1.to_k_t", "attn1.to_v_t", "attn1.to_out_t"]  # stream's in double blocks
SHARED = ["ff_i.shared_experts.w1", "ff_i.shared_experts.w2", "ff_i.shared_experts.w3", "ff_t.w1", "ff_t.w2", "ff_t.w3"]
HIDREAM_PRESETS: dict[str, list[str] | str] = {
    # diffusers' HiDream LoRA script default (to_q, to_k, to_v, to_out), both streams
    "attention": ATTENTION,
    # + the shared expert of each image feed-forward and the text stream's feed-forward: every token's path
    "attention_mlp": ATTENTION + SHARED,
}
HIDREAM_WORDS = TRANSFORMER_WORDS + ("double_stream_blocks", "single_stream_blocks", "to_q_t", "to_k_t", "to_v_t",
                                     "to_out_t", "ff_i", "ff_t", "shared_experts")


@dataclass(frozen=True)
class HiDreamFamily(Family):
    training_scheduler = SanaFamily.training_scheduler  # a FlowMatch grid with the sampler's (flow_)shift

    def check_recipe(self, recipe) -> None:
        super().check_recipe(recipe)
        method = recipe.method
        if hasattr(method, "denoiser_targets") and reaches_routed_experts(method.denoiser_targets(self)):
            raise ValueError("method.targets: HiDream's routed experts run without gradients (diffusers' MoE path "
                             "outside train mode), so adapters there would never learn: leave out experts.* (or "
                             "bare w1 / w2 / w3) and use ff_i.shared_experts, as the presets do")

    def encode_prompt(self, comps, captions: list[str], device: Any) -> dict[str, torch.Tensor]:
        from diffusers import HiDreamImagePipeline

        parts = {n: comps.encoder(n) for n in ENCODERS}
        parts |= {t: comps.tokenizer_for(n) for n, t in zip(ENCODERS, TOKENIZERS, strict=True)}
        text_only = HiDreamImagePipeline(scheduler=None, vae=None, transformer=None, **parts)
        t5, _, llama, _, pooled, _ = text_only.encode_prompt(list(captions), device=device,
                                                             do_classifier_free_guidance=False,
                                                             max_sequence_length=self.sequence_length(comps))
        return {"prompt_embeds": t5, "llama_embeds": llama.transpose(0, 1), "pooled_prompt_embeds": pooled}

    def pipeline_prompt_kwargs(self, text, negative) -> dict[str, Any]:
        kwargs = {"prompt_embeds_t5": text["prompt_embeds"], "pooled_prompt_embeds": text["pooled_prompt_embeds"],
                  "prompt_embeds_llama3": text["llama_embeds"].transpose(0, 1)}
        if negative is not None:
            kwargs |= {"negative_prompt_embeds_t5": negative["prompt_embeds"],
                       "negative_prompt_embeds_llama3": negative["llama_embeds"].transpose(0, 1),
                       "negative_pooled_prompt_embeds": negative["pooled_prompt_embeds"]}
        return kwargs

    def predict(self, denoiser, noisy, timesteps, text, batch) -> torch.Tensor:
        out = denoiser(hidden_states=noisy, timesteps=timesteps, encoder_hidden_states_t5=text["prompt_embeds"],
                       encoder_hidden_states_llama3=text["llama_embeds"].transpose(0, 1),
                       pooled_embeds=text["pooled_prompt_embeds"], return_dict=False)[0]
        inner = getattr(getattr(denoiser, "module", denoiser), "_orig_mod", getattr(denoiser, "module", denoiser))
        if inner.training and not inner.config.get("force_inference_output", False):
            # `full` trains the model in train mode (its own MoE training path): the output then comes as
            # [B, C, tokens, p * p] patches; put them back in the latents' layout
            b, c, h, w = noisy.shape
            p = inner.config.patch_size
            out = out.reshape(b, c, h // p, w // p, p, p).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)
        return -out  # HiDreamImagePipeline negates the output: the model predicts x0 - noise


def reaches_routed_experts(targets: list[str] | str) -> bool:
    """Whether LoRA targets (suffixes peft matches, or one regex it full-matches) adapt a routed expert."""
    import re

    sample = "double_stream_blocks.0.block.ff_i.experts.0.w1"
    if isinstance(targets, str):
        return bool(re.fullmatch(targets, sample))
    return any(sample == t or sample.endswith("." + t) for t in targets)


HIDREAM = HiDreamFamily("hidream", **llm_flow_transformer(
    pipeline_class="HiDreamImagePipeline",
    denoiser_class="HiDreamImageTransformer2DModel",
    text_encoder_names=ENCODERS,
    tokenizer_names=TOKENIZERS,
    # logit-normal on the base's statically shifted grid (3.0), as SD3-style models train
    flow_defaults={"sampling": "logit_normal", "resolution_shift": False},
    patch_size=2,
    max_sequence_length=128,  # HiDreamImagePipeline's default (T5 and Llama)
    kohya_names={"transformer": ModuleNames("lora_transformer", words=HIDREAM_WORDS)},
    base_version="hidream",
    modelspec_arch={"flow": "hidream-i1"},
    lora_presets=HIDREAM_PRESETS,
    default_guidance=5.0,  # the pipeline's guidance_scale (HiDream-I1-Full; Dev / Fast: 0.0)
    frozen_text_encoder="Llama-3.1-8B, T5-XXL and two CLIPs",
    sampling=Sampling(50, 5.0, what="HiDream-I1 Full"),  # the pipeline's defaults
))
