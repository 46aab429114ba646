"""Tiny random models of each family, built offline from configs (tests and plumbing checks: shapes and
wiring, not learning). Tokenizers come from the toy base (CLIP BPE) or are built here (a T5-style Unigram
tokenizer over a small vocabulary), so nothing is downloaded.

    build_tiny("sd3", folder)      # a StableDiffusion3Pipeline folder, a few MB
"""

from __future__ import annotations

from pathlib import Path

WORDS = (
    "a an the of on in with and at by photo picture painting drawing of sks ohwx dog cat person man woman "
    "red yellow green blue purple orange pink black white gray brown circle square triangle star heart "
    "lined dotted checkered striped background big small tiny large close-up portrait style"
).split()


def t5_tokenizer(folder: Path, words: tuple[str, ...] | list[str] = tuple(WORDS)):
    """A T5-style tokenizer (Unigram over `words`, SentencePiece-like Metaspace, `</s>` appended, pad id 0)
    written to `folder`; characters cover any other word, so every caption tokenizes."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz0123456789,.-'!?():;"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -1.0) for w in dict.fromkeys(words)] + [("\u2581", -3.0)] + [(c, -5.0) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    t5 = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)
    t5.model_max_length = 512
    t5.save_pretrained(folder)
    return T5TokenizerFast.from_pretrained(folder)


def clip_tokenizer():
    from transformers import CLIPTokenizer

    from finetune.toy import toy_base_path

    return CLIPTokenizer.from_pretrained(toy_base_path() / "tokenizer")


def _clip(vocab: int, hidden: int, projection: int, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=projection, hidden_act=act))


def _t5(vocab: int, width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab, d_model=width, d_kv=8, d_ff=2 * width, num_layers=2,
                                   num_heads=2, relative_attention_num_buckets=8, dense_act_fn="gelu_new",
                                   feed_forward_proj="gated-gelu", is_encoder_decoder=False))


def _vae16(**extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32),
                         norm_num_groups=8, sample_size=32, use_quant_conv=False, use_post_quant_conv=False, **extra)


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
    import shutil

    shutil.rmtree(folder / "_t5_tokenizer")
    return folder


def build_tiny_flux(folder: Path, seed: int = 0, guidance: bool = True) -> Path:
    """FLUX-shaped: one double-stream and one single-stream block (2 heads of 16, rotary axes 4 + 6 + 6), a
    CLIP-L-style encoder whose pooled output (16 wide) feeds pooled_projections, a T5 encoder 32 wide, a
    16-channel VAE with FLUX's shift and scale factors (2x2 packing: 64 input channels), guidance embedding
    as in [dev] (`guidance=False`: [schnell]) and FLUX's resolution-dependent scheduler."""
    import shutil

    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
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
    pipe = FluxPipeline(transformer=transformer, vae=_vae16(scaling_factor=0.3611, shift_factor=0.1159),
                        text_encoder=clip, tokenizer=tok, text_encoder_2=_t5(len(tok2), 32), tokenizer_2=tok2,
                        scheduler=scheduler)
    pipe.save_pretrained(folder)
    shutil.rmtree(folder / "_t5_tokenizer")
    return folder


def _qwen_family(name: str):
    def build(folder: Path, **kwargs) -> Path:
        from finetune.models import tiny_qwen

        return getattr(tiny_qwen, f"build_tiny_{name}")(folder, **kwargs)

    return build


def _wan(kind: str):
    def build(folder: Path, **kwargs) -> Path:
        from finetune.models.tiny_wan import build_tiny_wan

        return build_tiny_wan(folder, kind, **kwargs)

    return build


BUILDERS = {"sd3": build_tiny_sd3, "flux": build_tiny_flux,
            **{n: _qwen_family(n) for n in ("z_image", "qwen_image", "flux2_klein")},  # finetune/models/tiny_qwen.py
            "wan": _wan("t2v"), "wan_i2v": _wan("i2v"), "wan_experts": _wan("experts")}  # finetune/models/tiny_wan.py


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
