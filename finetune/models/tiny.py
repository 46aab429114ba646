"""Tiny random models of each family, built offline from configs (tests, benchmarks and plumbing checks: shapes
and wiring, not learning). Tokenizers come from the toy base (CLIP BPE) or are built here, so nothing is
downloaded: a T5-style Unigram tokenizer over a small vocabulary, and for the Qwen-family language models
(Z-Image, Qwen-Image, FLUX.2 [klein]) the byte-level BPE of finetune/models/tiny_text.py.

    build_tiny("sd3", folder)      # a StableDiffusion3Pipeline folder, a few MB
    build_tiny("z_image", folder)  # also: "flux", "qwen_image", "flux2_klein", "chroma", "flux2_dev", "wan",
                                   # "wan_i2v", "wan_experts", "lumina2", "sana", "krea2", "hidream",
                                   # "hunyuanimage", "qwen_image21" (tiny_llm.py)
"""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

# shared with tiny_llm.py (re-exported: reference.py and the tests import them from here)
from finetune.models.tiny_text import (  # noqa: F401
    EDIT_SYSTEM,
    QWEN_IMAGE_SYSTEM,
    WORDS,
    _clip,
    _qwen25_vl,
    _save,
    _seeded,
    _t5,
    _vae16,
    clip_tokenizer,
    qwen_tokenizer,
    t5_tokenizer,
)


def build_tiny_sd3(folder: Path, seed: int = 0, t5: bool = True) -> Path:
    """SD3-shaped: an MMDiT with 2 joint blocks (the last one context-pre-only, as in SD3), two CLIP text
    encoders with projections (16 + 16 = the pooled width 32), a T5 encoder 32 wide (= joint_attention_dim;
    the CLIP states, 16 + 16, are padded to it), a 16-channel VAE with SD3's shift and scale factors and
    the flow-matching scheduler with SD3's static shift 3.0."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    folder = Path(folder)
    torch.manual_seed(seed)
    tok = clip_tokenizer()
    tok3 = t5_tokenizer(folder / "_t5_tokenizer")
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=16)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=_vae16(scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=_clip(tok.vocab_size, 16, 16), text_encoder_2=_clip(tok.vocab_size, 16, 16, act="gelu"),
        text_encoder_3=_t5(len(tok3), 32) if t5 else None, tokenizer=tok, tokenizer_2=tok,
        tokenizer_3=tok3 if t5 else None, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.save_pretrained(folder)
    shutil.rmtree(folder / "_t5_tokenizer")
    return folder


def build_tiny_flux(folder: Path, seed: int = 0, guidance: bool = True, kontext: bool = False) -> Path:
    """FLUX-shaped: one double-stream and one single-stream block (2 heads of 16, rotary axes 4 + 6 + 6), a
    CLIP-L-style encoder whose pooled output (16 wide) feeds pooled_projections, a T5 encoder 32 wide, a
    16-channel VAE with FLUX's shift and scale factors (2x2 packing: 64 input channels), guidance embedding
    as in [dev] (`guidance=False`: [schnell]) and FLUX's resolution-dependent scheduler. `kontext`: saved as a
    FLUX.1 Kontext pipeline (the same parts; model_index.json names FluxKontextPipeline)."""
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxKontextPipeline,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(seed)
    tok = clip_tokenizer()
    tok2 = t5_tokenizer(folder / "_t5_tokenizer")
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=guidance,
        axes_dims_rope=(4, 6, 6))
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = (FluxKontextPipeline if kontext else FluxPipeline)(
        transformer=transformer, vae=_vae16(scaling_factor=0.3611, shift_factor=0.1159), text_encoder=clip,
        tokenizer=tok, text_encoder_2=_t5(len(tok2), 32), tokenizer_2=tok2, scheduler=scheduler)
    pipe.save_pretrained(folder)
    shutil.rmtree(folder / "_t5_tokenizer")
    return folder


def build_tiny_chroma(folder: Path, seed: int = 0) -> Path:
    """Chroma-shaped: FLUX's tiny layout (one double- and one single-stream block, 2 heads of 16, rotary axes
    4 + 6 + 6, 64 packed input channels) with Chroma's approximator (2 layers 32 wide) in place of the
    modulation linears, a T5 encoder 32 wide and no CLIP, FLUX's VAE factors and resolution-shift scheduler."""
    import torch
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    folder = Path(folder)
    torch.manual_seed(seed)
    tok = t5_tokenizer(folder / "_t5_tokenizer")
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6), approximator_num_channels=16,
        approximator_hidden_dim=32, approximator_layers=2)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = ChromaPipeline(transformer=transformer, vae=_vae16(scaling_factor=0.3611, shift_factor=0.1159),
                          text_encoder=_t5(len(tok), 32), tokenizer=tok, scheduler=scheduler)
    pipe.save_pretrained(folder)
    shutil.rmtree(folder / "_t5_tokenizer")
    return folder


def _qwen3(vocab: int, hidden: int, layers: int, causal_lm: bool = False):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    config = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024)
    model = (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config)
    return model.to(torch.float32)


def build_tiny_z_image(folder: Path, seed: int = 0) -> Path:
    """Z-Image-shaped: a single-stream DiT (2 layers, 1 noise + 1 context refiner, 2 heads of 16, rotary axes
    8 + 4 + 4) reading the second-to-last hidden state of a Qwen3 encoder 16 wide, FLUX's 16-channel VAE
    factors, and Z-Image-Turbo's scheduler (static shift 3)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    folder, tok = _seeded(folder, seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 4, 4], axes_lens=[1024, 64, 64])
    with torch.no_grad():  # the pad tokens are allocated uninitialised (torch.empty)
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    pipe = ZImagePipeline(
        transformer=transformer, vae=_vae16(scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=_qwen3(len(tok), 16, 3), tokenizer=tok,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False))
    return _save(pipe, folder)


# Qwen-Image's scheduler: shift by image size at inference (exponential time shift, 0.5 at 256 tokens to 0.9 at
# 8192), stretched to end at 0.02
QWEN_IMAGE_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
                            max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192,
                            time_shift_type="exponential", shift_terminal=0.02)


def build_tiny_qwen_image(folder: Path, seed: int = 0) -> Path:
    """Qwen-Image-shaped: an MMDiT of 2 blocks (2 heads of 16, rotary axes 8 + 12 + 12) reading the last hidden
    state of a Qwen2.5-VL encoder 32 wide, a 16-channel causal-video VAE with Qwen-Image's per-channel latent
    mean and std, and Qwen-Image's scheduler."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    folder, tok = _seeded(folder, seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, guidance_embeds=False, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1,
                                 temperal_downsample=[False, True])
    pipe = QwenImagePipeline(transformer=transformer, vae=vae, text_encoder=_qwen25_vl(len(tok), 32), tokenizer=tok,
                             scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER))
    return _save(pipe, folder)


def build_tiny_qwen_image_edit(folder: Path, seed: int = 0, plus: bool = False, zero_cond_t: bool = False) -> Path:
    """Qwen-Image-Edit-shaped: the tiny Qwen-Image parts, a Qwen2.5-VL encoder that sees images (one vision block,
    its image tokens the tokenizer's), the processor that turns images into those tokens, saved as a
    QwenImageEditPipeline; `plus`: a QwenImageEditPlusPipeline (Edit-2509), with `zero_cond_t` (Edit-2511)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2VLImageProcessorPil

    from finetune.models.families.qwen_image_edit import image_processor_only

    folder, tok = _seeded(folder, seed, vision=True)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, guidance_embeds=False, axes_dims_rope=(4, 6, 6), zero_cond_t=zero_cond_t)
    vae = AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1,
                                 temperal_downsample=[False, True])
    processor = image_processor_only()(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tok)
    cls = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    pipe = cls(transformer=transformer, vae=vae, text_encoder=_qwen25_vl(len(tok), 32, tok), tokenizer=tok,
               processor=processor, scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER))
    _save(pipe, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]  # as the real bases name it
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


# FLUX.2's scheduler (inference shifts by an empirical, step-dependent mu; see the family file)
FLUX2_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                       max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")


def _flux2_parts(guidance: bool = False):
    """One double- and one single-stream FLUX.2 block (2 heads of 16, rotary axes 4 x 4) reading 3 x 16 wide text
    states, and a VAE of 4 latent channels (16 after the 2x2 patchify) with batch-norm statistics far from (0, 1),
    as the real VAE's are, so that the normalisation matters."""
    import torch
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=3 * 16, timestep_guidance_channels=256, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance)
    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                             up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32),
                             layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32,
                             use_quant_conv=False, use_post_quant_conv=False)
    with torch.no_grad():
        vae.bn.running_mean.uniform_(-0.5, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    return transformer, vae


def _flux2_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER)


def build_tiny_flux2_klein(folder: Path, seed: int = 0, distilled: bool = True) -> Path:
    """FLUX.2 [klein]-shaped: `_flux2_parts` without a guidance input, reading hidden states 9, 18 and 27 of a
    Qwen3 causal LM (28 layers 16 wide: the layers the pipeline reads exist); `distilled=False`: [klein] Base
    (the pipeline then samples with CFG)."""
    from diffusers import Flux2KleinPipeline

    folder, tok = _seeded(folder, seed)
    transformer, vae = _flux2_parts()
    pipe = Flux2KleinPipeline(transformer=transformer, vae=vae, text_encoder=_qwen3(len(tok), 16, 28, causal_lm=True),
                              tokenizer=tok, scheduler=_flux2_scheduler(), is_distilled=distilled)
    return _save(pipe, folder)


# Mistral's chat template as FLUX.2 [dev] renders it: system and user turns with text parts, no generation prompt
MISTRAL_TEMPLATE = (
    "{{- bos_token -}}{%- for m in messages -%}"
    "{%- set text = m['content'] if m['content'] is string else m['content'] | map(attribute='text') | join('') -%}"
    "{%- if m['role'] == 'system' -%}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' -}}"
    "{%- else -%}{{- '[INST]' + text + '[/INST]' -}}{%- endif -%}{%- endfor -%}"
)


def mistral_tokenizer(qwen):
    """A Mistral-style tokenizer over `qwen_tokenizer`'s byte-level BPE: <s> / </s> / <pad> and the instruction
    specials, Mistral's chat template (system and user turns, text parts)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=qwen.backend_tokenizer, chat_template=MISTRAL_TEMPLATE)
    tok.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "additional_special_tokens":
                            ["[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]"]})
    tok.model_max_length = 32768
    return tok


def build_tiny_flux2_dev(folder: Path, seed: int = 0) -> Path:
    """FLUX.2 [dev]-shaped: [klein]'s tiny layout with a guidance input, reading hidden states 10, 20 and 30 of
    a Mistral-3 encoder (30 layers 16 wide, a one-layer Pixtral vision tower it never uses), and the byte-level BPE
    of `qwen_tokenizer` with Mistral's specials and chat template (FLUX.2's system message is then ~150 tokens)."""
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    folder, qwen = _seeded(folder, seed)
    tok = mistral_tokenizer(qwen)
    config = Mistral3Config(
        text_config={"model_type": "mistral", "vocab_size": len(tok) + 8, "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 30, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
                     "max_position_embeddings": 1024},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "intermediate_size": 32, "image_size": 28, "patch_size": 14, "head_dim": 8},
        image_token_index=len(tok) + 1, spatial_merge_size=1)
    transformer, vae = _flux2_parts(guidance=True)
    pipe = Flux2Pipeline(transformer=transformer, vae=vae, text_encoder=Mistral3ForConditionalGeneration(config),
                         tokenizer=tok, scheduler=_flux2_scheduler())
    return _save(pipe, folder)


# Wan 2.1 text-to-video, 2.1 image-to-video (CLIP image encoder) and 2.2 with two experts split at a boundary:
# UMT5 32 wide over the T5-style tokenizer, a causal video VAE with 16 latent channels (4x time, 8x space),
# Wan's UniPC sampler on flow sigmas
WAN_KINDS = ("t2v", "i2v", "experts")


def tiny_wan_transformer(in_channels: int = 16, image_dim: int | None = None, layers: int = 2):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=in_channels, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=layers, rope_max_seq_len=32, image_dim=image_dim,
        added_kv_proj_dim=24 if image_dim else None)


def tiny_wan_vae():
    from diffusers import AutoencoderKLWan

    # latents_mean / latents_std: Wan's own 16 per-channel statistics (the config's defaults)
    return AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True])


def wan_sampler(flow_shift: float = 3.0):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift,
                                   num_train_timesteps=1000)


def umt5_encoder(vocab: int, width: int = 32):
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(vocab_size=vocab, d_model=width, d_kv=8, d_ff=2 * width, num_layers=2,
                                       num_heads=2, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                                       is_encoder_decoder=False))


def _clip_image_parts():
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, projection_dim=16, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=32, intermediate_size=32,
                                               patch_size=8))
    return {"image_encoder": encoder, "image_processor": CLIPImageProcessor(crop_size=32, size=32)}


def build_tiny_wan(folder: Path, kind: str = "t2v", seed: int = 0, boundary_ratio: float = 0.875) -> Path:
    """A WanPipeline ('t2v', 'experts': Wan 2.2's two experts at `boundary_ratio`) or WanImageToVideoPipeline
    ('i2v', Wan 2.1's: CLIP image encoder, 36 input channels) folder."""
    import shutil

    import torch
    from diffusers import WanImageToVideoPipeline, WanPipeline

    if kind not in WAN_KINDS:
        raise ValueError(f"kind must be one of {WAN_KINDS}")
    folder = Path(folder)
    torch.manual_seed(seed)
    tok = t5_tokenizer(folder / "_tokenizer")
    parts = dict(tokenizer=tok, text_encoder=umt5_encoder(len(tok)), vae=tiny_wan_vae(), scheduler=wan_sampler())
    if kind == "i2v":
        image = _clip_image_parts()
        parts |= image
        pipe = WanImageToVideoPipeline(transformer=tiny_wan_transformer(36, image["image_encoder"].config.hidden_size),
                                       **parts)
    elif kind == "experts":
        pipe = WanPipeline(transformer=tiny_wan_transformer(), transformer_2=tiny_wan_transformer(),
                           boundary_ratio=boundary_ratio, **parts)
    else:
        pipe = WanPipeline(transformer=tiny_wan_transformer(), **parts)
    pipe.save_pretrained(folder)
    shutil.rmtree(folder / "_tokenizer")
    return folder


def _wan(kind: str):
    def build(folder: Path, **kwargs) -> Path:
        return build_tiny_wan(folder, kind, **kwargs)

    return build


BUILDERS = {"sd3": build_tiny_sd3, "flux": build_tiny_flux, "z_image": build_tiny_z_image,
            "qwen_image": build_tiny_qwen_image, "flux2_klein": build_tiny_flux2_klein, "chroma": build_tiny_chroma,
            "flux2_dev": build_tiny_flux2_dev, "wan": _wan("t2v"), "wan_i2v": _wan("i2v"), "wan_experts": _wan("experts"),
            "flux_kontext": partial(build_tiny_flux, kontext=True), "qwen_image_edit": build_tiny_qwen_image_edit,
            "qwen_image_edit_plus": partial(build_tiny_qwen_image_edit, plus=True)}


def _llm_family(name: str):
    def build(folder: Path, **kwargs) -> Path:  # finetune/models/tiny_llm.py imports this module
        from finetune.models import tiny_llm

        return getattr(tiny_llm, f"build_tiny_{name}")(folder, **kwargs)

    return build


BUILDERS |= {name: _llm_family(name) for name in ("lumina2", "sana", "krea2", "hidream", "hunyuanimage",
                                                       "qwen_image21")}


def build_tiny(family: str, folder: Path, **kwargs) -> Path:
    return BUILDERS[family](Path(folder), **kwargs)


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m finetune.models.tiny",
                                description="Build a tiny random model of a family (plumbing checks, offline).")
    p.add_argument("family", choices=sorted(BUILDERS))
    p.add_argument("folder", type=Path)
    args = p.parse_args(argv)
    print(build_tiny(args.family, args.folder))


if __name__ == "__main__":
    main()
