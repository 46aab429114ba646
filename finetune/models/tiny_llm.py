"""Tiny random models of the newer language-model-conditioned families, built offline like those of
finetune/models/tiny.py: Lumina 2 and Sana on a Gemma-style tokenizer (BPE with byte fallback, `<bos>` first, pad
id 0, Gemma's space-to-'▁' normaliser) trained here on a few sentences and a Gemma-2 encoder 16 wide; Krea 2 on
tiny.py's Qwen tokenizer and a Qwen3-VL encoder; each family's denoiser and VAE at a few hundred kB.

    build_tiny("lumina2", folder)
    build_tiny("sana", folder)
    build_tiny("krea2", folder)
"""

from __future__ import annotations

import json
from pathlib import Path

from finetune.models.tiny_text import WORDS, _save
from finetune.models.tiny_text import _seeded as seeded

GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # ids 0-4, as Gemma's


def gemma_tokenizer(folder: Path, corpus: tuple[str, ...] = ()):
    """A GemmaTokenizer over our words (and `corpus`, e.g. a pipeline's system prompt, so that it takes about as
    many tokens as with the real tokenizer), written to `folder` and loaded back from it."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.normalizer = normalizers.Replace(" ", "\u2581")
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")  # merges stay in words
    fallback = [f"<0x{i:02X}>" for i in range(256)]  # Gemma's byte-fallback pieces: any character tokenizes
    trainer = trainers.BpeTrainer(vocab_size=3000, min_frequency=1, show_progress=False,
                                  special_tokens=GEMMA_SPECIALS + fallback)
    bpe.train_from_iterator([*corpus, " ".join(WORDS)], trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    GemmaTokenizer(vocab=model["vocab"], merges=merges, add_bos_token=True).save_pretrained(folder)
    return GemmaTokenizer.from_pretrained(folder)


def _gemma2(vocab: int, hidden: int = 16, layers: int = 2):
    from transformers import Gemma2Config, Gemma2Model

    return Gemma2Model(Gemma2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                    num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                    head_dim=8, max_position_embeddings=1024, sliding_window=64))


def _vae16_by8(scaling_factor: float, shift_factor: float):
    """FLUX.1's 16-channel VAE layout at 8x downsampling (Lumina2Pipeline assumes 8; tiny.py's is 4x)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16),
                         norm_num_groups=8, sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
                         scaling_factor=scaling_factor, shift_factor=shift_factor)


def _seeded(folder: Path, seed: int, corpus: tuple[str, ...]):
    """tiny_text's seeded folder with a Gemma tokenizer (over `corpus` too) in it."""
    return seeded(folder, seed, tokenizer=lambda where: gemma_tokenizer(where, corpus))


def build_tiny_lumina2(folder: Path, seed: int = 0) -> Path:
    """Lumina 2-shaped: a Next-DiT of 2 joint layers after 1 context and 1 noise refiner, 32 wide with 2 query
    heads over 1 key/value head (grouped as the real 24 over 8), rotary axes 4 + 6 + 6, reading the second-to-last
    hidden state of a Gemma-2 encoder 16 wide; a VAE with FLUX.1's factors at 8x (64 px: 8x8 latents); the flow-matching scheduler with Lumina 2's
    static shift 6 (the pipeline's resolution mu is ignored by a scheduler that does not shift dynamically)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

    from finetune.models.families.lumina2 import PROMPT_START, system_prompt

    folder, tok = _seeded(folder, seed, (system_prompt() + PROMPT_START,))
    transformer = Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, hidden_size=32, num_layers=2, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 6, 6), axes_lens=(300, 64, 64),
        cap_feat_dim=16)
    pipe = Lumina2Pipeline(transformer=transformer, vae=_vae16_by8(0.3611, 0.1159),
                           text_encoder=_gemma2(len(tok)), tokenizer=tok,
                           scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=6.0))
    return _save(pipe, folder)


def build_tiny_sana(folder: Path, seed: int = 0, **transformer) -> Path:
    """Sana-shaped: 2 blocks 32 wide (linear self-attention with 2 heads of 16, softmax cross-attention with 2
    heads of 16 over Gemma-2 states 16 wide, the GLUMBConv feed-forward), a DC-AE of 3 stages (4x, 8 latent
    channels, the last stage EfficientViT) with a scaling factor far from 1, and Sana's DPM-Solver flow sampler
    (flow_shift 3). `transformer`: config overrides (Sana Sprint's guidance input and time scale, for detection)."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

    from finetune.models.families.sana import complex_human_instruction

    folder, tok = _seeded(folder, seed, ("\n".join(complex_human_instruction()),))
    denoiser = SanaTransformer2DModel(**{
        "in_channels": 8, "out_channels": 8, "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2,
        "num_cross_attention_heads": 2, "cross_attention_head_dim": 16, "cross_attention_dim": 32,
        "caption_channels": 16, "sample_size": 16, **transformer})
    blocks = ("ResBlock", "ResBlock", "EfficientViTBlock")
    vae = AutoencoderDC(in_channels=3, latent_channels=8, attention_head_dim=8, encoder_block_types=blocks,
                        decoder_block_types=blocks, encoder_block_out_channels=(8, 16, 16),
                        decoder_block_out_channels=(8, 16, 16), encoder_layers_per_block=(1, 1, 1),
                        decoder_layers_per_block=(1, 1, 1), encoder_qkv_multiscales=((), (), (5,)),
                        decoder_qkv_multiscales=((), (), (5,)), scaling_factor=0.41407)
    sampler = DPMSolverMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                          use_flow_sigmas=True, flow_shift=3.0)
    pipe = SanaPipeline(tokenizer=tok, text_encoder=_gemma2(len(tok)), vae=vae, transformer=denoiser, scheduler=sampler)
    return _save(pipe, folder)


def _qwen3_vl(vocab: int, hidden: int = 16, layers: int = 3):
    """A Qwen3-VL model (text 16 wide, multimodal rotary sections 2 + 1 + 1, a one-block vision tower never used)."""
    from transformers import Qwen3VLConfig, Qwen3VLModel

    return Qwen3VLModel(Qwen3VLConfig(
        text_config={"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 2 * hidden,
                     "num_hidden_layers": layers, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
                     "max_position_embeddings": 1024,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 5e5, "mrope_section": [2, 1, 1],
                                         "mrope_interleaved": True}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": hidden,
                       "deepstack_visual_indexes": []},
        image_token_id=vocab - 1, video_token_id=vocab - 2, vision_start_token_id=vocab - 3,
        vision_end_token_id=vocab - 4))


def build_tiny_krea2(folder: Path, seed: int = 0, distilled: bool = False) -> Path:
    """Krea 2-shaped: 2 single-stream blocks (2 query heads of 16 over 1 key/value head, rotary axes 4 + 6 + 6) after
    a text fusion of 1 layer-wise and 1 refiner block over 2 stacked Qwen3-VL states (layers 1 and 3 of 3, 16 wide),
    Qwen-Image's tiny VAE (4x) with its per-channel statistics, and Krea 2's scheduler (exponential shift, mu 0.5 at
    256 tokens to 1.15 at 6400); `distilled`: the few-step checkpoint's pipeline setting."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        Krea2Pipeline,
        Krea2Transformer2DModel,
    )

    folder, tok = seeded(folder, seed)
    transformer = Krea2Transformer2DModel(
        in_channels=64, num_layers=2, attention_head_dim=16, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, timestep_embed_dim=32, text_hidden_dim=16, num_text_layers=2, text_num_attention_heads=2,
        text_num_key_value_heads=2, text_intermediate_size=32, num_layerwise_text_blocks=1, num_refiner_text_blocks=1,
        axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1,
                                 temperal_downsample=[False, True])
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=6400)
    pipe = Krea2Pipeline(scheduler=scheduler, vae=vae, text_encoder=_qwen3_vl(len(tok)), tokenizer=tok,
                         transformer=transformer, text_encoder_select_layers=(1, 3), is_distilled=distilled)
    return _save(pipe, folder)


def build_tiny_hidream(folder: Path, seed: int = 0) -> Path:
    """HiDream-I1-shaped: one double- and one single-stream block (4 heads of 8, rotary axes 4 + 2 + 2) whose image
    feed-forward has a shared and 4 routed experts (2 per token), two CLIP encoders with projections (16 + 16 = the
    pooled width 32), a T5 encoder 32 wide, a Llama encoder of 2 layers 16 wide over `qwen_tokenizer`'s BPE, FLUX's
    16-channel VAE factors and the flow-matching scheduler with HiDream's static shift 3."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        HiDreamImagePipeline,
        HiDreamImageTransformer2DModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    from finetune.models.tiny_text import _t5, _vae16, clip_tokenizer, t5_tokenizer

    folder, qwen = seeded(folder, seed)
    llama_tok = PreTrainedTokenizerFast(tokenizer_object=qwen.backend_tokenizer)
    llama_tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                                  "pad_token": "<|end_of_text|>"})
    llama_tok.model_max_length = 128
    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer(folder / "_tokenizer_t5")

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=clip_tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, projection_dim=16, hidden_act="gelu"))

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(llama_tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                         max_position_embeddings=256))
    transformer = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_channels=[32, 16], text_emb_dim=32, num_routed_experts=4,
        num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(32, 32), llama_layers=(0, 1))
    pipe = HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae16(scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=clip(), tokenizer=clip_tok, text_encoder_2=clip(), tokenizer_2=clip_tok,
        text_encoder_3=_t5(len(t5_tok), 32), tokenizer_3=t5_tok, text_encoder_4=llama, tokenizer_4=llama_tok,
        transformer=transformer)
    import shutil

    shutil.rmtree(folder / "_tokenizer_t5", ignore_errors=True)
    return _save(pipe, folder)


def build_tiny_hunyuanimage(folder: Path, seed: int = 0) -> Path:
    """HunyuanImage-2.1-shaped: one double- and one single-stream block (2 heads of 16, rotary axes 8 + 8, patch 1)
    after a token refiner of 1 block, reading the third-to-last hidden state of a Qwen2.5-VL encoder 32 wide
    (tiny.py's) and byT5 glyph states (ByT5's byte tokenizer, built offline, and a T5 encoder 16 wide), a
    16-channel HunyuanImage VAE at 4x, the flow-matching scheduler with the base's static shift 5, and the adaptive
    projected guiders the base ships (one for prompts with quoted text)."""
    from diffusers import (
        AutoencoderKLHunyuanImage,
        FlowMatchEulerDiscreteScheduler,
        HunyuanImagePipeline,
        HunyuanImageTransformer2DModel,
    )
    from diffusers.guiders import AdaptiveProjectedMixGuidance
    from transformers import ByT5Tokenizer

    from finetune.models.tiny_text import _qwen25_vl, _t5

    folder, tok = seeded(folder, seed)
    byt5_tok = ByT5Tokenizer()
    transformer = HunyuanImageTransformer2DModel(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=4.0, patch_size=(1, 1), text_embed_dim=32,
        text_embed_2_dim=16, rope_axes_dim=(8, 8))
    vae = AutoencoderKLHunyuanImage(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 32, 64),
                                    layers_per_block=1, spatial_compression_ratio=4, sample_size=64,
                                    scaling_factor=0.75289)
    pipe = HunyuanImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0), vae=vae,
        text_encoder=_qwen25_vl(len(tok), 32), tokenizer=tok, text_encoder_2=_t5(len(byt5_tok), 16),
        tokenizer_2=byt5_tok, transformer=transformer, guider=AdaptiveProjectedMixGuidance(guidance_scale=3.5),
        ocr_guider=AdaptiveProjectedMixGuidance(guidance_scale=3.5))
    return _save(pipe, folder)


# a Qwen3-VL-style chat template over the tiny tokenizer: message content as a string or as a list of text parts
# (how QwenImage21Pipeline asks for its system message's tokens)
QWEN3_VL_TEMPLATE = (
    "{%- for message in messages -%}{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
    "{%- for part in message['content'] -%}{{- part['text'] -}}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")


def build_tiny_qwen_image21(folder: Path, seed: int = 0) -> Path:
    """Qwen-Image-2.1-shaped: 2 single-stream block-causal blocks (2 heads of 16, rotary axes 4 + 6 + 6, patch 1)
    reading the last state of a Qwen3-VL encoder 16 wide through its processor (tiny.py's Qwen tokenizer with the
    vision specials and a Qwen3-VL-style chat template; no video processor), an RGBA VAE at 16x with 16 latent
    channels and per-channel statistics far from (0, 1), and the pipeline's resolution-shift scheduler (mu 0.5 at
    256 tokens to 1.15 at 4096)."""
    import torch
    from diffusers import (
        AutoencoderKLQwenImage21,
        FlowMatchEulerDiscreteScheduler,
        QwenImage21Pipeline,
        QwenImage21Transformer2DModel,
    )
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from finetune.models.families.qwen_image21 import text_processor

    folder, tok = seeded(folder, seed, vision=True)
    processor = text_processor()(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tok,
                                 chat_template=QWEN3_VL_TEMPLATE)
    ids = [tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                   "<|vision_end|>")]
    encoder = Qwen3VLForConditionalGeneration(Qwen3VLConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "max_position_embeddings": 1024,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 5e5, "mrope_section": [2, 1, 1],
                                         "mrope_interleaved": True}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16,
                       "deepstack_visual_indexes": []},
        image_token_id=ids[0], video_token_id=ids[1], vision_start_token_id=ids[2], vision_end_token_id=ids[3]))
    transformer = QwenImage21Transformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        context_in_dim=16, mlp_ratio=3, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKLQwenImage21(
        base_dim=8, decoder_base_dim=8, z_dim=16, dim_mult=[1, 1, 2, 2, 2], num_res_blocks=1,
        temperal_downsample=[False, True, True, True], latents_mean=torch.linspace(-0.5, 0.5, 16).tolist(),
        latents_std=torch.linspace(0.5, 2.0, 16).tolist())
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    pipe = QwenImage21Pipeline(scheduler=scheduler, vae=vae, text_encoder=encoder, processor=processor,
                               transformer=transformer)
    _save(pipe, folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["processor"] == ["transformers", "Qwen3VLProcessor"]  # as the real base names it
    return folder
