"""How much of a caption the text encoder reads: token counts with the base's own tokenizer.

CLIP (Stable Diffusion 1.x/2.x, SDXL, and the pooled prompt of SD3/FLUX) reads 77 tokens, begin and end
markers included, so 75 of the caption's own; whatever follows is cut off and never trains anything.
"""

from __future__ import annotations

from pathlib import Path

from finetune.errors import DataError

_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json", "spiece.model")


def _tokenizer_dir(spec: str) -> tuple[str, str | None]:
    """(what to load, subfolder) for 'toy', a diffusers base folder, a tokenizer folder or a hub id."""
    if spec == "toy":
        from finetune.toy import toy_base_path

        return str(toy_base_path() / "tokenizer"), None
    p = Path(spec).expanduser()
    if p.is_dir():
        if (p / "tokenizer").is_dir():
            return str(p / "tokenizer"), None
        if any((p / f).is_file() for f in _FILES):
            return str(p), None
        raise DataError(f"{p}: neither a tokenizer folder nor a diffusers base with a tokenizer/ sub-folder")
    return spec, "tokenizer"  # a hub id of a diffusers base


def load_tokenizer(spec: str, max_tokens: int | None = None):
    """(tokenizer, window): the window is `max_tokens`, else the tokenizer's model_max_length (77 for CLIP)."""
    from transformers import AutoTokenizer

    where, sub = _tokenizer_dir(spec)
    try:
        tok = AutoTokenizer.from_pretrained(where, subfolder=sub) if sub else AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError) as e:
        line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{spec}: cannot load its tokenizer ({line}); pass --tokenizer toy, a base folder or "
                        "a tokenizer folder") from None
    window = max_tokens or tok.model_max_length
    if not window or window > 100_000:  # tokenizers without a limit report a huge sentinel
        window = 77
    return tok, int(window)


def overflow(tok, text: str, window: int) -> tuple[int, int, str]:
    """(tokens with begin/end markers, tokens past the window, the text that falls off)."""
    ids = tok(text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    lost = len(ids) - window
    if lost <= 0:
        return len(ids), 0, ""
    specials = set(tok.all_special_ids)
    tail = [i for i in ids[window - 1 :] if i not in specials]  # the end marker takes the window's last slot
    return len(ids), lost, tok.decode(tail).strip()
