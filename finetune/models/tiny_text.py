"""Offline tokenizers and the small helpers the tiny builders share (finetune/models/tiny.py, tiny_llm.py): the
words every tiny tokenizer keeps whole, a T5-style Unigram tokenizer, the toy base's CLIP tokenizer, tiny CLIP and
T5 encoders and FLUX's 16-channel VAE layout, and for the Qwen-family language models (Z-Image, Qwen-Image, FLUX.2, Krea
2) a byte-level BPE with Qwen's own pre-tokenizer, trained here on a few sentences so that every word of them is
one token: the Qwen-Image prompt template's system part is then 34 tokens, as with the real tokenizer (the pipeline
drops exactly 34), and the chat template renders a user turn the way Qwen3's does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

WORDS = (
    "a an the of on in with and at by photo picture painting drawing of sks ohwx dog cat person man woman "
    "red yellow green blue purple orange pink black white gray brown circle square triangle star heart "
    "lined dotted checkered striped background big small tiny large close-up portrait style"
).split()


# Qwen-Image's system prompt (QwenImagePipeline.prompt_template_encode): the words the tokenizer must keep whole
QWEN_IMAGE_SYSTEM = ("Describe the image by detailing the color, shape, size, texture, quantity, text, spatial "
                     "relationships of the objects and background:")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
VISION_SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen-Image-Edit's system prompt (QwenImageEditPipeline.prompt_template_encode)
EDIT_SYSTEM = ("Describe the key features of the input image (color, shape, size, texture, objects, background), "
               "then explain how the user's text instruction should alter or modify the image. Generate a new image "
               "that meets the user's requirements while maintaining consistency with the original input where "
               "appropriate.")

# A user turn as Qwen3's chat template writes it: the assistant header follows when a generation prompt is asked
# for, and with thinking switched off an empty think block closes it (Z-Image asks with thinking on, FLUX.2
# [klein] with it off)
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)


def qwen_tokenizer(folder: Path, vision: bool = False):
    """A Qwen2Tokenizer (byte-level BPE, Qwen's split regex, ChatML specials, pad = <|endoftext|>, right
    padding) over our words, written to `folder` and loaded back from it. `vision`: also Qwen2.5-VL's image
    specials and the edit system prompt's words (Qwen-Image-Edit), so its 64 dropped tokens are that prompt."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    corpus = [QWEN_IMAGE_SYSTEM, "system\nuser\nassistant\n", " ".join(WORDS)] + ([EDIT_SYSTEM] if vision else [])
    trainer = trainers.BpeTrainer(vocab_size=4000, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges)
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[1:] + (VISION_SPECIALS if vision else [])})
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 32768
    tok.save_pretrained(folder)
    return Qwen2Tokenizer.from_pretrained(folder)


def _seeded(folder: Path, seed: int, vision: bool = False, tokenizer=None):
    """(folder, a tokenizer written inside it for `_save` to remove) with torch's generator seeded; the tokenizer
    is `qwen_tokenizer`'s unless `tokenizer` (a function of the folder to write it to) builds another."""
    import torch

    folder = Path(folder)
    torch.manual_seed(seed)
    build = tokenizer or (lambda where: qwen_tokenizer(where, vision))
    return folder, build(folder / "_tokenizer")


def _save(pipe, folder: Path) -> Path:
    pipe.save_pretrained(folder)
    shutil.rmtree(folder / "_tokenizer", ignore_errors=True)
    return folder


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


def _qwen25_vl(vocab: int, hidden: int, tok=None):
    """A Qwen2.5-VL model; with `tok` (a vision tokenizer) its image token ids are that tokenizer's."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = ([tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                   "<|vision_end|>")] if tok is not None
           else [vocab - 1, vocab - 2, vocab - 3, vocab - 4])
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 2 * hidden,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "max_position_embeddings": 4096, "bos_token_id": None, "eos_token_id": None,
                     "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": hidden},
        image_token_id=ids[0], video_token_id=ids[1], vision_start_token_id=ids[2], vision_end_token_id=ids[3])
    return Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)
