"""Offline tokenizers and the small helpers the tiny builders share (finetune/models/tiny.py, tiny_llm.py): the
words every tiny tokenizer keeps whole, and for the Qwen-family language models (Z-Image, Qwen-Image, FLUX.2, Krea
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
