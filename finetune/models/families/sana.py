"""Sana (NVIDIA, 0.6B / 1.6B; 1.5 alike): a linear-attention DiT (`SanaTransformer2DModel`) on a deep-compression
autoencoder (DC-AE, 32x downsampling, 32 channels), trained with rectified flow and driven as `SanaPipeline`
drives it:

- text: the pipeline's complex human instruction (CHI, `SanaPipeline.__call__`'s default), then the caption
  lower-cased and stripped (`_text_preprocessing`), tokenized by Gemma's tokenizer with right padding to the CHI's
  tokens + `max_sequence_length` (300) - 2; Gemma-2-2B-it's last hidden state and mask, of which the first token
  and the last 299 are kept (`select_index`: the instruction drops out, the caption stays). The cross-attention
  reads the mask as a bias, so it travels with the states (`prompt_attention_mask`);
- latents: the DC-AE's `latent` (deterministic: it has no distribution) times `scaling_factor`, no shift; patch 1;
- timestep: sigma * 1000 times the transformer's `timestep_scale`; the output is the flow velocity (noise - x0,
  the DPM-Solver sampler's `flow_prediction`).

Objective: Sana was trained with logit-normal timesteps on the flow grid shifted statically by `flow_shift` (3.0
at 1024 px; NVlabs/Sana's train configs: `weighting_scheme: logit_normal`, `flow_shift`), which the base's
DPM-Solver config carries: the training grid is FlowMatch with that shift. diffusers' Sana script reads the
scheduler folder as FlowMatch, loses `flow_shift` (shift 1) and samples uniformly, without the CHI.

Linear attention, a decision: the self-attention (`attn1`) is ReLU-kernel linear attention
(`SanaLinearAttnProcessor2_0`: ReLU(Q) (ReLU(K)^T V), normalised), the cross-attention (`attn2`) is softmax over
the caption. Both keep plain `to_q` / `to_k` / `to_v` / `to_out.0` linears, so LoRA adapts them the same way:
the adapter changes the projections before the kernel, the kernel itself has no weights, and nothing in peft,
the exports or the loaders differs. The presets adapt both attentions (a LoRA on the linear attention alone
trains too: tests/test_sana.py shows its gradients pass the ReLU kernel). The feed-forward is convolutional
(GLUMBConv): `attention_mlp` adds its two 1x1 convolutions, not the depthwise 3x3 one (its weights are per
channel, 9 each: nothing low-rank to gain).

Guidance: real CFG (4.5 in the pipeline) against an empty negative prompt, which the pipeline encodes without
the CHI; with cached text, validation's negative is encoded as training encodes an empty caption (with it).
ComfyUI has no Sana model: its LoRA loader maps no Sana key, so the exports are the diffusers file (and a kohya
file of diffusers names, `lora_transformer_*`, that only this project's converter reads).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finetune.export.layouts import TRANSFORMER_WORDS, ModuleNames
from finetune.models.family import Family, llm_flow_transformer
from finetune.models.sampling import Sampling

if TYPE_CHECKING:
    import torch

MASK = "prompt_attention_mask"

ATTENTION = [f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")]
SANA_PRESETS: dict[str, list[str] | str] = {
    # both attentions' q/k/v/out in every block (diffusers' Sana script default: to_q, to_k, to_v of both)
    "attention": ATTENTION,
    # + the GLUMBConv's 1x1 convolutions (inverted bottleneck in, point-wise out)
    "attention_mlp": ATTENTION + ["ff.conv_inverted", "ff.conv_point"],
}
SANA_WORDS = TRANSFORMER_WORDS + ("conv_inverted", "conv_point", "conv_depth")


@dataclass(frozen=True)
class SanaFamily(Family):
    def matches(self, model_index, denoiser_config, text_encoder_config) -> bool:
        """The transformer class, in a SanaPipeline folder: Sana Sprint shares the class but is a consistency
        model (TrigFlow time, its own pipeline), which this flow objective does not train."""
        return super().matches(model_index, denoiser_config, text_encoder_config) \
            and model_index.get("_class_name", self.pipeline_class) == self.pipeline_class

    def encode_prompt(self, comps, captions: list[str], device: Any) -> dict[str, torch.Tensor]:
        tok, encoder = comps.tokenizer_for("text_encoder"), comps.encoder("text_encoder")
        length = self.sequence_length(comps)
        chi = "\n".join(complex_human_instruction())
        texts = [chi + c for c in empty_pipeline()._text_preprocessing(list(captions))]
        total = len(tok.encode(chi)) + length - 2  # SanaPipeline._get_gemma_prompt_embeds
        inputs = tok(texts, padding="max_length", max_length=total, truncation=True, add_special_tokens=True,
                     return_tensors="pt", padding_side="right")
        mask = inputs.attention_mask.to(device)
        states = encoder(inputs.input_ids.to(device), attention_mask=mask)[0]
        keep = [0, *range(-length + 1, 0)]  # encode_prompt's select_index: <bos> and the last length - 1 tokens
        return {"prompt_embeds": states[:, keep], MASK: mask[:, keep]}

    def pipeline_prompt_kwargs(self, text, negative) -> dict[str, Any]:
        kwargs = super().pipeline_prompt_kwargs(text, negative)
        if negative is not None:  # SanaPipeline's negative_prompt defaults to "", which it refuses beside embeddings
            kwargs["negative_prompt"] = None
        return kwargs

    def encode_latents(self, vae, pixel_values: torch.Tensor) -> torch.Tensor:
        """The DC-AE's latent (it has no distribution to take a mode of) times `scaling_factor`, as diffusers'
        Sana script encodes and SanaPipeline decodes (`latents / scaling_factor`)."""
        latents = vae.encode(pixel_values.to(vae.device, vae.dtype, non_blocking=True)).latent
        return latents.float() * vae.config.scaling_factor

    def training_scheduler(self, scheduler):
        """The FlowMatch grid with the DPM-Solver sampler's `flow_shift` (Sana's training shift)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        c = scheduler.config
        if "flow_shift" not in c:
            return type(scheduler).from_config(c)
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=c.num_train_timesteps, shift=c.flow_shift)

    def predict(self, denoiser, noisy, timesteps, text, batch) -> torch.Tensor:
        inner = getattr(getattr(denoiser, "module", denoiser), "_orig_mod", getattr(denoiser, "module", denoiser))
        scale = inner.config.get("timestep_scale", 1.0)  # SanaPipeline: t * transformer.config.timestep_scale
        return denoiser(noisy, encoder_hidden_states=text["prompt_embeds"], timestep=timesteps * scale,
                        encoder_attention_mask=text[MASK].to(noisy.device), return_dict=False)[0]


@functools.cache
def empty_pipeline():
    """A SanaPipeline without components: its caption preprocessing, read without weights."""
    from diffusers import SanaPipeline

    return SanaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=None, scheduler=None)


@functools.cache
def complex_human_instruction() -> tuple[str, ...]:
    """The instruction SanaPipeline.__call__ puts before every prompt by default (its signature's default)."""
    from diffusers import SanaPipeline

    return tuple(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)


SANA = SanaFamily("sana", **llm_flow_transformer(
    pipeline_class="SanaPipeline",
    denoiser_class="SanaTransformer2DModel",
    # logit-normal on the grid statically shifted by the sampler's flow_shift (NVlabs/Sana's training configs)
    flow_defaults={"sampling": "logit_normal", "resolution_shift": False},
    patch_size=1,
    max_sequence_length=300,  # SanaPipeline's default (and Sana's model_max_length)
    kohya_names={"transformer": ModuleNames("lora_transformer", words=SANA_WORDS)},
    base_version="sana",
    modelspec_arch={"flow": "sana"},
    lora_presets=SANA_PRESETS,
    text_masks={MASK: "long"},  # the cross-attention turns it into a bias
    default_guidance=4.5,  # SanaPipeline's guidance_scale (real CFG)
    frozen_text_encoder="Gemma-2-2B-it",
    sampling=Sampling(20, 4.5, what="Sana"),  # the pipeline's defaults (and the model cards' examples)
))
