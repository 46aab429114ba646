"""Wan 2.1 / 2.2 video transformers (`WanTransformer3DModel`) trained with rectified flow, driven exactly as
`WanPipeline` (text-to-video) and `WanImageToVideoPipeline` (image-to-video) drive them:

- text: each caption cleaned as the pipeline cleans it (`prompt_clean`), tokenized to `max_sequence_length`
  (512) tokens and encoded by UMT5-XXL with its attention mask; the states past each caption's own tokens are
  zeroed (the pipeline cuts and zero-pads them), so cached captions stack and the transformer sees the same;
- latents: clips [B, 3, F, H, W] in [-1, 1] (an image is a one-frame clip) through the causal video VAE
  (4x in time: F = 4k + 1 frames give k + 1 latent frames; 8x in space), the distribution's mode normalised
  per channel with the VAE's `latents_mean` / `latents_std` as the pipelines un-normalise before decoding;
- timestep: the scheduler's timestep, sigma x 1000 (the pipelines pass `t` as it is). The bases ship a UniPC
  sampler on flow sigmas shifted by `flow_shift` (3.0 for Wan 2.1 at 480p); training draws its noise levels
  on the FlowMatch grid with that same shift, so it sees the noise levels the sampler visits;
- image-to-video: the first frame is the condition, built as `WanImageToVideoPipeline.prepare_latents` builds
  it (the first frame followed by zero frames through the VAE, normalised; a 4-channel mask marking the first
  latent frame), concatenated to the noisy latents on the channel axis; Wan 2.1 I2V also reads the CLIP
  image encoder's second-to-last hidden state of that frame (`encoder_hidden_states_image`);
- Wan 2.2 A14B: two experts, `transformer` for timesteps at or above `boundary_ratio` x 1000 (high noise) and
  `transformer_2` below it (low noise). `model.experts` trains one of them, or both taking turns by step; each
  trains only on the timesteps it owns. Each expert's LoRA is its own file: the high-noise one under the
  usual name, the low-noise one with a `_low_noise` suffix (diffusers: `load_lora_weights(...,
  load_into_transformer_2=True)`; ComfyUI: on the low-noise model's LoRA loader).

Wan 2.2 TI2V 5B (`expand_timesteps`) trains as text-to-video: its per-token timesteps are all `t` there,
which is the same computation as one timestep per clip. Its image-to-video mode (a clean first latent frame
at timestep 0) is not trained here.

LoRA keys for ComfyUI (and musubi-tuner, which diffusers also reads) use the original Wan module names
(`blocks.0.self_attn.q`, `cross_attn.k_img`, `ffn.0`, `head.head`, ...) after `lora_unet_`: ComfyUI's
comfy/lora.py maps 'lora_unet_' + every model weight's name with '_' for '.'.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finetune.export.layouts import ModuleNames
from finetune.models.family import Family, llm_flow_transformer

if TYPE_CHECKING:
    import torch

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]  # add_*: I2V's image keys / values
WAN_PRESETS: dict[str, list[str]] = {
    # self- and cross-attention of every block (diffusers' Wan LoRA script trains to_q/k/v/out)
    "attention": ATTENTION,
    # + the feed-forward: every linear of every block, as musubi-tuner and ai-toolkit train Wan
    "attention_ffn": ATTENTION + ["ffn.net.0.proj", "ffn.net.2"],
}

# diffusers module path -> the original Wan name (what ComfyUI's model and musubi-tuner's LoRA keys use)
_BLOCK = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
          "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
          "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "attn2.add_k_proj": "cross_attn.k_img",
          "attn2.add_v_proj": "cross_attn.v_img", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}
_TOP = {"condition_embedder.time_embedder.linear_1": "time_embedding.0",
        "condition_embedder.time_embedder.linear_2": "time_embedding.2",
        "condition_embedder.time_proj": "time_projection.1",
        "condition_embedder.text_embedder.linear_1": "text_embedding.0",
        "condition_embedder.text_embedder.linear_2": "text_embedding.2",
        "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
        "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
        "proj_out": "head.head", "patch_embedding": "patch_embedding"}
# compound words of the original names (kohya keys write '.' as '_')
WAN_WORDS = ("self_attn", "cross_attn", "k_img", "v_img", "time_embedding", "time_projection", "text_embedding",
             "img_emb", "patch_embedding")


@dataclass(frozen=True)
class WanNames(ModuleNames):
    """Wan LoRA keys as ComfyUI and musubi-tuner name them: 'lora_unet_' + the original module name."""

    words: tuple[str, ...] = WAN_WORDS

    def to_ui(self, path: str) -> str:
        if m := re.fullmatch(r"blocks\.(\d+)\.(.+)", path):
            if m[2] in _BLOCK:
                return f"blocks.{m[1]}.{_BLOCK[m[2]]}"
        elif path in _TOP:
            return _TOP[path]
        from finetune.errors import ModelError

        raise ModelError(f"Wan module '{path}' has no name in ComfyUI's Wan model; adapt attention / ffn "
                         "modules only, or export the diffusers format alone")

    def from_ui(self, dotted: str) -> str | None:
        if m := re.fullmatch(r"blocks\.(\d+)\.(.+)", dotted):
            back = {v: k for k, v in _BLOCK.items()}
            return f"blocks.{m[1]}.{back[m[2]]}" if m[2] in back else None
        return {v: k for k, v in _TOP.items()}.get(dotted)


@dataclass(frozen=True)
class WanFamily(Family):
    #: image-to-video: the first frame conditions the clip (WanImageToVideoPipeline)
    i2v: bool = False

    def matches(self, model_index, denoiser_config, text_encoder_config) -> bool:
        if not super().matches(model_index, denoiser_config, text_encoder_config):
            return False
        channels = denoiser_config.get("in_channels", 16)
        return (channels != denoiser_config.get("out_channels", channels)) == self.i2v

    # ------------------------------------------------------------------------------------- text
    def encode_prompt(self, comps, captions: list[str], device: Any) -> dict[str, torch.Tensor]:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        tok, encoder = comps.tokenizer_for("text_encoder"), comps.encoder("text_encoder")
        length = self.sequence_length(comps)
        inputs = tok([prompt_clean(c) for c in captions], padding="max_length", max_length=length, truncation=True,
                     add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        mask = inputs.attention_mask.to(device)
        # the memory estimate runs this on the meta device, where transformers cannot read a mask's values
        hidden = encoder(inputs.input_ids.to(device), None if mask.is_meta else mask).last_hidden_state
        return {"prompt_embeds": hidden * mask[..., None].to(hidden.dtype)}  # zeros past each caption's tokens

    def guidance_kwargs(self, pipe, scale: float | None) -> dict[str, Any]:
        # Wan 2.2's low-noise expert takes the same scale unless guidance_scale_2 is given (the pipeline's rule)
        return {"guidance_scale": self.default_guidance if scale is None else scale}

    # ------------------------------------------------------------------------------------- latents
    def encode_latents(self, vae, pixel_values: torch.Tensor) -> torch.Tensor:
        clip = pixel_values if pixel_values.ndim == 5 else pixel_values.unsqueeze(2)  # an image: one frame
        z = vae.encode(clip.to(vae.device, vae.dtype, non_blocking=True)).latent_dist.mode()
        return normalise(vae, z.float())


    def encode_conditions(self, comps, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Image-to-video: the first frame as WanImageToVideoPipeline encodes its input image."""
        if not self.i2v:
            return {}
        import torch

        vae = comps.vae
        clip = pixel_values if pixel_values.ndim == 5 else pixel_values.unsqueeze(2)
        first = clip[:, :, :1]
        video = torch.cat([first, first.new_zeros(*first.shape[:2], clip.shape[2] - 1, *first.shape[3:])], dim=2)
        z = vae.encode(video.to(vae.device, vae.dtype)).latent_dist.mode()
        out = {"cond_latents": normalise(vae, z.float())}
        if "image_encoder" in comps.parts:  # Wan 2.1 I2V: CLIP's view of the frame
            out["image_embeds"] = clip_image_embeds(comps, first[:, :, 0])
        return out

    # ------------------------------------------------------------------------------------- denoiser
    def training_scheduler(self, scheduler):
        """The FlowMatch grid with the base sampler's shift (UniPC's `flow_shift`; a FlowMatch sampler as is)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        c = scheduler.config
        if "flow_shift" not in c:
            return type(scheduler).from_config(c)
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=c.num_train_timesteps, shift=c.flow_shift)

    def expert_ranges(self, pipeline_config, scheduler) -> dict[str, tuple[float, float]]:
        ratio = pipeline_config.get("boundary_ratio")
        if ratio is None:
            return {}
        n = scheduler.config.num_train_timesteps
        return {"transformer": (ratio * n, float(n)), "transformer_2": (0.0, ratio * n)}

    def predict(self, denoiser, noisy, timesteps, text, batch) -> torch.Tensor:
        import torch

        conds = batch.get("conditions") or {}
        hidden = noisy
        if self.i2v:
            cond = conds["cond_latents"].to(noisy.dtype)
            hidden = torch.cat([noisy, first_frame_mask(noisy), cond], dim=1)
        image = conds.get("image_embeds")
        return denoiser(hidden_states=hidden, timestep=timesteps, encoder_hidden_states=text["prompt_embeds"],
                        encoder_hidden_states_image=image, return_dict=False)[0]

    def export_groups(self, trained: list[str]) -> list[tuple[str, dict[str, str]]]:
        """Wan 2.2: one LoRA file per expert, each naming its expert `transformer` (diffusers loads the
        low-noise file with load_into_transformer_2=True; ComfyUI applies it to the low-noise model)."""
        groups = [("", {n: n for n in trained if n != "transformer_2"})]
        if "transformer_2" in trained:
            groups.append(("_low_noise", {"transformer_2": "transformer"}))
        return [g for g in groups if g[1]]

    def check_recipe(self, recipe) -> None:
        super().check_recipe(recipe)
        video = recipe.data.video
        counts = {"data.video.frames": [video.frames] if video else [], "validation.frames": [recipe.validation.frames],
                  "data.video.frame_buckets": (video.frame_buckets or []) if video else []}
        for key, values in counts.items():
            bad = [n for n in values if n is not None and (n - 1) % 4]
            if bad:
                near = (bad[0] - 1) // 4 * 4 + 1
                raise ValueError(f"{key}: {bad[0]} frames; Wan's VAE packs 4 frames into one latent after the first, so "
                                 f"clips have 4k + 1 frames: use {near} or {near + 4}")
        if recipe.train.flow.resolution_shift:
            raise ValueError("train.flow.resolution_shift: Wan trains on its base's static shift (the sampler's "
                             "flow_shift), whose grid the experts' timestep ranges are cut from; remove it")


def normalise(vae, z: torch.Tensor) -> torch.Tensor:
    """(z - latents_mean) / latents_std per channel: what the Wan pipelines undo before decoding."""
    import torch

    mean = torch.tensor(vae.config.latents_mean, device=z.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=z.device).view(1, -1, 1, 1, 1)
    return (z - mean) / std


def first_frame_mask(latents: torch.Tensor) -> torch.Tensor:
    """[B, 4, F, H, W]: ones on the first latent frame (the 4 pixel frames it stands for), zeros elsewhere, as
    WanImageToVideoPipeline.prepare_latents builds it for a first-frame condition."""
    b, _, f, h, w = latents.shape
    mask = latents.new_zeros(b, 4, f, h, w)
    mask[:, :, 0] = 1
    return mask


def clip_image_embeds(comps, frames: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> the CLIP image encoder's second-to-last hidden state, as
    WanImageToVideoPipeline.encode_image computes it from the frame as an image."""
    from PIL import Image

    arrays = ((frames.float() + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()
    encoder = comps.parts["image_encoder"]
    inputs = comps.parts["image_processor"](images=[Image.fromarray(a) for a in arrays], return_tensors="pt")
    pixels = inputs.pixel_values.to(encoder.device, encoder.dtype)
    return encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2].float()


def _wan(name: str, **fields: Any) -> WanFamily:
    return WanFamily(name, **llm_flow_transformer(
        denoiser_class="WanTransformer3DModel",
        # logit-normal u on the base's statically shifted grid (musubi-tuner's 'shift' sampling with the
        # sampler's own shift)
        flow_defaults={"sampling": "logit_normal", "resolution_shift": False},
        patch_size=2,
        kohya_names={"transformer": WanNames("lora_unet")},
        lora_presets=WAN_PRESETS,
        default_guidance=5.0,
        swap_blocks=("blocks",),
        frozen_text_encoder="UMT5-XXL",
        experts={"high_noise": "transformer", "low_noise": "transformer_2"},
        pipeline_config_keys=("boundary_ratio", "expand_timesteps"),
        video=True,
        **fields,
    ))


WAN = _wan("wan", pipeline_class="WanPipeline", base_version="wan", modelspec_arch={"flow": "wan"})
WAN_I2V = _wan(
    "wan_i2v", pipeline_class="WanImageToVideoPipeline", i2v=True, extra_parts=("image_processor", "image_encoder"),
    start_image=True,
    base_version="wan_i2v", modelspec_arch={"flow": "wan-i2v"})
