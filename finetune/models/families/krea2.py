"""Krea 2 (Krea AI): a single-stream MMDiT (`Krea2Transformer2DModel`) reading a stack of Qwen3-VL hidden states
through its own small text-fusion transformer, on Qwen-Image's VAE, trained with rectified flow and driven as
`Krea2Pipeline` drives it:

- text: Qwen-Image's chat template as one fixed-length block (`get_text_hidden_states`): the system prefix and the
  caption padded to `max_sequence_length` (512) + 34 - 5 tokens, then the assistant suffix after the padding;
  positions from the mask's running count; hidden states of the pipeline's `text_encoder_select_layers` (a
  pipeline setting, kept with the base) stacked per token, the 34 prefix tokens dropped. The boolean mask travels
  with the states (`prompt_embeds_mask`): the transformer uses it as an SDPA key mask, so it stays boolean;
- latents: Qwen-Image's VAE, per-channel `(z - latents_mean) / latents_std` (what the pipeline undoes before
  decoding), packed into 2x2 patches (`_pack_latents`) with (0, row, column) positions after the text's zeros
  (`prepare_position_ids`);
- timestep: sigma (t / 1000); the output is the flow velocity (noise - x0), stepped by the Euler scheduler as is.

Objective: logit-normal sigmas with the resolution shift the pipeline samples with (its scheduler's exponential
shift, mu from 0.5 at 256 tokens to 1.15 at 6400). Krea has published no training recipe I could read; this is
the pipeline's schedule, as for Qwen-Image. The few-step distilled checkpoint (`is_distilled`, mu fixed at 1.15,
8 steps, guidance 0) is a pipeline setting too: it samples as the pipeline says, and trains the same way.

Guidance: the pipeline's CFG is `cond + scale * (cond - uncond)` (guidance 0: the conditional prediction alone),
4.5 by default for the base. ComfyUI: the comfy/lora.py and comfy/utils.py I could read have no Krea 2 model, so
no UI key table is claimed; the exports are the diffusers file (and a kohya file of diffusers names,
`lora_transformer_*`, that this project's converter reads back).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from finetune.export.layouts import TRANSFORMER_WORDS, ModuleNames
from finetune.models.families.qwen_image import QwenImageFamily
from finetune.models.family import Family, llm_flow_transformer
from finetune.models.sampling import Sampling

if TYPE_CHECKING:
    import torch

MASK = "prompt_embeds_mask"
PATCH = 2  # Krea2Pipeline's patch_size default (a pipeline setting, kept with the base)

ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]
KREA2_PRESETS: dict[str, list[str] | str] = {
    # the main blocks' attention (q/k/v/out; its output gate `to_gate` stays frozen); the text-fusion blocks
    # have the same names, so the regex keeps to transformer_blocks
    "attention": r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)",
    # + the SwiGLU feed-forward (gate, up, down) and the attention gate: every linear of every main block
    "attention_mlp": r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|to_gate)|ff\.(gate|up|down))",
}
KREA2_WORDS = TRANSFORMER_WORDS + ("to_gate", "text_fusion", "layerwise_blocks", "refiner_blocks")


@dataclass(frozen=True)
class Krea2Family(Family):
    encode_latents = QwenImageFamily.encode_latents  # the same VAE and normalisation as Qwen-Image

    def encode_prompt(self, comps, captions: list[str], device: Any) -> dict[str, torch.Tensor]:
        from diffusers import Krea2Pipeline

        kept = comps.extras.get("pipeline_config", {})
        text_only = Krea2Pipeline(scheduler=None, vae=None, text_encoder=comps.encoder("text_encoder"),
                                  tokenizer=comps.tokenizer_for("text_encoder"), transformer=None,
                                  text_encoder_select_layers=kept.get("text_encoder_select_layers"))
        states, mask = text_only.get_text_hidden_states(list(captions), self.sequence_length(comps), device)
        return {"prompt_embeds": states, MASK: mask}

    def predict(self, denoiser, noisy, timesteps, text, batch) -> torch.Tensor:
        from diffusers import Krea2Pipeline

        b, c, h, w = noisy.shape
        shape = SimpleNamespace(patch_size=PATCH, vae_scale_factor=1)  # latent-space sizes
        packed = Krea2Pipeline._pack_latents(shape, noisy, b, c, h, w)
        embeds = text["prompt_embeds"]
        ids = Krea2Pipeline.prepare_position_ids(embeds.shape[1], h // PATCH, w // PATCH, noisy.device)
        out = denoiser(hidden_states=packed, encoder_hidden_states=embeds, timestep=timesteps / 1000,
                       position_ids=ids, encoder_attention_mask=text[MASK].to(noisy.device).bool(),
                       return_dict=False)[0]
        return Krea2Pipeline._unpack_latents(shape, out, h, w).squeeze(2)


KREA2 = Krea2Family("krea2", **llm_flow_transformer(
    pipeline_class="Krea2Pipeline",
    denoiser_class="Krea2Transformer2DModel",
    # logit-normal sigmas shifted by image size as the pipeline samples (exponential shift, mu 0.5 -> 1.15 over
    # 256 -> 6400 tokens)
    flow_defaults={"sampling": "logit_normal", "resolution_shift": True},
    patch_size=PATCH,
    kohya_names={"transformer": ModuleNames("lora_transformer", words=KREA2_WORDS)},
    # the pipeline's own settings a pipeline we assemble must keep: which encoder layers it reads, distilled or not
    pipeline_config_keys=("text_encoder_select_layers", "is_distilled", "patch_size"),
    base_version="krea2",
    modelspec_arch={"flow": "krea-2"},
    lora_presets=KREA2_PRESETS,
    text_masks={MASK: "bool"},  # an SDPA key mask: boolean hides padding (a float one would be added)
    default_guidance=4.5,
    frozen_text_encoder="Qwen3-VL-4B",
    sampling=Sampling(28, 4.5, what="Krea 2"),  # the pipeline's example for the base (distilled: 8 steps, 0.0)
))
