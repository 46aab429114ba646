"""Captioning models built offline: tiny ones for tests and demos, and random models of a real shape for timing.

Nothing here downloads. The tiny models use a word-level tokenizer over a small vocabulary and random weights,
so their captions are strings of those words; what they prove is the plumbing (batching, prompts, decoding,
files), not caption quality. `florence2_base_shape` has the layer sizes of Florence-2-base with random weights:
its captions/s is what the real default model costs, its words are noise.
"""

from __future__ import annotations

from pathlib import Path

WORDS = (
    "a an the of in on with and photo picture image red green blue yellow purple white black grey square circle "
    "triangle heart star dog cat person sks background small large bright dark , . ? : what does is shown "
    "describe detail detailed this tags list comma separated short sentence user assistant"
).split()


def tiny_tokenizer(special: list[str], named: dict[str, str], **roles: str):
    """A fast word-level tokenizer: `special` tokens first (ids 0..), then WORDS. `roles` sets bos/eos/pad/unk,
    `named` registers model-specific tokens as attributes (image_token='<image>' -> tokenizer.image_token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(dict.fromkeys(special + WORDS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token=roles["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation apart: "describe?" -> describe, ?
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    extra = named or [t for t in special if t not in roles.values()]
    return PreTrainedTokenizerFast(tokenizer_object=core, extra_special_tokens=extra, **roles)


def _florence_tokenizer():
    return tiny_tokenizer(["<s>", "<pad>", "</s>", "<unk>", "<image>"], {"image_token": "<image>"},
                          bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def build_tiny_florence(path: str | Path, seed: int = 0) -> Path:
    """A Florence-2-shaped captioner (DaViT vision tower + BART) of ~80k parameters, saved with its processor."""
    import torch
    from transformers import (
        BartConfig,
        CLIPImageProcessorPil,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )

    tok = _florence_tokenizer()
    text = BartConfig(vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                      decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                      bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2,
                      init_std=0.5)
    # 64 px input, total stride 32: a 2x2 feature map = 4 spatial tokens + 1 pooled one
    vision = dict(depths=[1, 1, 1, 1], embed_dim=[8, 16, 16, 32], num_heads=[1, 1, 1, 2], num_groups=[1, 1, 1, 2],
                  window_size=2, projection_dim=32, drop_path_rate=0.0)
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(
        Florence2Config(text_config=text.to_dict(), vision_config=vision, image_token_id=tok.image_token_id)
    ).eval()
    _make_image_sensitive(model)
    model.generation_config.update(min_new_tokens=3, num_beams=1, do_sample=False)
    images = CLIPImageProcessorPil(size={"height": 64, "width": 64}, do_center_crop=False, crop_size=None,
                                   image_seq_length=5)
    processor = Florence2Processor(image_processor=images, tokenizer=tok)
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}:{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %} {{ c['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def build_tiny_chat(path: str | Path, seed: int = 0) -> Path:
    """A SmolVLM-shaped (Idefics3: SigLIP-like vision tower + Llama) chat captioner with a chat template."""
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        LlamaConfig,
    )

    special = ["<|im_start|>", "<pad>", "<unk>", "<image>", "<fake_token_around_image>", "<end_of_utterance>",
               "<global-img>", "User", "Assistant"]
    tok = tiny_tokenizer(special, {}, bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<pad>",
                         unk_token="<unk>")
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       initializer_range=0.3)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(Idefics3Config(
        text_config=text.to_dict(), vision_config=vision, scale_factor=2, pad_token_id=tok.pad_token_id,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )).eval()
    _make_image_sensitive(model)
    model.generation_config.update(min_new_tokens=3, do_sample=False)
    images = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 32},
                                       max_image_size={"longest_edge": 32})
    # (32 / 8)^2 patches, merged 2x2 by the pixel shuffle: 4 image tokens
    processor = Idefics3Processor(image_processor=images, tokenizer=tok, image_seq_len=4, chat_template=_CHAT_TEMPLATE)
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _make_image_sensitive(model) -> None:
    """Random tiny models mostly ignore their image (small init, one layer): scale the vision side up so
    different images give different captions, which is what lets tests catch a caption written to the
    wrong file."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("vision" in name or "projector" in name or "connector" in name) and p.dim() > 1:
                p.mul_(8.0)


# ------------------------------------------------------------------------------------- real shapes, random
def florence2_base_shape():
    """(model, processor) with Florence-2-base's layer sizes (DaViT 128-1024, BART-base 6+6 layers, 768 px,
    577 image tokens, vocabulary 51289) and random weights: for timing only; the processor's tokenizer is
    the tiny one, the image processor is the real 768 px one."""
    import torch
    from transformers import (
        BartConfig,
        CLIPImageProcessorPil,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )

    tok = _florence_tokenizer()
    text = BartConfig(vocab_size=51289, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                      decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072,
                      max_position_embeddings=1024, bos_token_id=0, pad_token_id=1, eos_token_id=2,
                      decoder_start_token_id=2, forced_eos_token_id=2)
    vision = dict(projection_dim=768, drop_path_rate=0.0)  # the other defaults are Florence-2-base's DaViT
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(
        Florence2Config(text_config=text.to_dict(), vision_config=vision, image_token_id=tok.image_token_id)
    ).eval()
    images = CLIPImageProcessorPil(size={"height": 768, "width": 768}, do_center_crop=False, crop_size=None,
                                   image_seq_length=577, resample=3)
    return model, Florence2Processor(image_processor=images, tokenizer=tok)
