"""`textual_inversion`: learn a new word. New token rows in each text encoder's input embedding train (a
parameter holding only those rows); every other weight, and every other embedding row, stays bit-identical.
The export, checkpoints and optimizer state are a few KB.

A concept is `token` (e.g. '<my-cat>') with `num_vectors` rows named like diffusers names them
('<my-cat>', '<my-cat>_1', ...), so `pipe.load_textual_inversion` + diffusers' prompt expansion give
the trained model back. `NewTokens` does the work and is shared with `pivotal` (new tokens + LoRA).

Config is pure pydantic; torch is imported only when the method is built.
"""

from __future__ import annotations

import functools
import json
import random
import re
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from finetune.methods.base import MethodConfig, register_method
from finetune.sections import StrictModel

# Captions for images that have none, in the spirit of the Textual Inversion paper's lists (own wording).
# '{}' is the placeholder token. Varied framing words keep the vectors from absorbing "photo of".
TEMPLATES: dict[str, list[str]] = {
    "object": [
        "a photo of a {}", "a picture of the {}", "a close-up photo of a {}", "a bright photo of the {}",
        "a dim photo of a {}", "a cropped photo of the {}", "a rendering of a {}", "an image of a small {}",
        "an image of a large {}", "the {} in soft light", "a clear photo of my {}", "a {} seen from the front",
        "a blurry photo of a {}", "a good photo of one {}",
    ],
    "style": [
        "a painting in the style of {}", "an illustration in the style of {}", "a house, {} style",
        "a landscape in the style of {}", "a portrait drawn in the style of {}", "a still life, style of {}",
        "artwork in {} style", "a city street in the style of {}", "flowers painted in the style of {}",
        "an animal sketched in the style of {}", "a small picture in the style of {}",
    ],
}
MAX_VECTORS = 75  # CLIP's 77 positions minus start and end: more vectors cannot fit a prompt


class TokenSettings(StrictModel):
    """One new concept: its placeholder token, how many vectors it has and where they start."""

    token: str = Field(description="The new word, e.g. '<my-cat>' (angle brackets keep it apart from real words).")
    num_vectors: int = Field(1, ge=1, le=MAX_VECTORS,
                             description="Vectors per text encoder; more capture more detail, and take prompt room.")
    initializer: str = Field(description="Word(s) the vectors start from, e.g. 'cat'; several words are averaged.")
    templates: Literal["object", "style", "none"] = Field(
        "object", description="Caption templates for images without a caption: object, style or none."
    )
    lr: float | None = Field(None, gt=0.0, le=1.0, description="Learning rate of the new vectors; default train.lr.")

    @field_validator("token")
    @classmethod
    def _token(cls, v: str) -> str:
        if not v.strip() or any(c.isspace() for c in v):
            raise ValueError("must be one word without spaces, e.g. '<my-cat>'")
        return v

    @field_validator("initializer")
    @classmethod
    def _initializer(cls, v: str) -> str:
        if not v.split():
            raise ValueError("must name at least one word, e.g. 'cat'")
        return " ".join(v.split())

    def placeholder_tokens(self) -> list[str]:
        """The token and its extra vectors, named as diffusers' load_textual_inversion names them."""
        return [self.token] + [f"{self.token}_{i}" for i in range(1, self.num_vectors)]

    def vocabulary_problem(self, vocab, where: str, key: str) -> str | None:
        """Why these settings do not fit a tokenizer's vocabulary (a set of entries), or None. A whole word is
        'word</w>' in CLIP's BPE and '▁word' in T5's sentencepiece vocabulary."""
        for word in self.placeholder_tokens():
            low = word.lower()  # CLIP lower-cases text, added tokens included
            if low in vocab or f"{low}</w>" in vocab or f"▁{low}" in vocab:
                bare = self.token.strip("<>")
                other = f"<{bare}>" if self.token != f"<{bare}>" else f"<{bare}-1>"
                return f"{key}.token: '{word}' is already in the vocabulary of {where}; choose a new word, e.g. '{other}'"
        for word in self.initializer.lower().split():
            if f"{word}</w>" not in vocab and f"▁{word}" not in vocab:
                return (f"{key}.initializer: '{word}' is not a word in the vocabulary of {where}; use a common "
                        "word close to the concept (several words are averaged)")
        return None

    def check_base(self, base, key: str) -> None:
        """Recipe-time vocabulary check against a local base folder (`base`: the recipe's `Base`; hub ids are
        checked at set-up)."""
        folders = local_vocabularies(str(base.folder)) if base.local and base.folder else {}
        for folder, vocab in folders.items():
            problem = self.vocabulary_problem(vocab, f"model.base '{base.name}' ({folder})", key)
            if problem:
                raise ValueError(problem)

    def template_check(self, recipe, key: str) -> None:
        rules = [recipe.data.caption_rules(s) for s in recipe.data.sources]
        if self.templates != "none" and any(r.caption_dropout > 0 for r in rules):
            raise ValueError(
                f"{key}.templates: '{self.templates}' fills empty captions, so caption dropout would train on "
                "templates instead of empty captions; set data caption_dropout: 0 or templates: none"
            )


@functools.lru_cache(maxsize=8)
def local_vocabularies(folder: str) -> dict[str, frozenset[str]]:
    """Entries of each tokenizer of a local diffusers folder (or a toy base), read as plain JSON."""
    root = Path(folder)
    out: dict[str, frozenset[str]] = {}
    for sub in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        entries: set[str] = set()
        for name in ("vocab.json", "added_tokens.json"):  # what slow tokenizers save
            f = root / sub / name
            if f.is_file():
                entries |= set(json.loads(f.read_text(encoding="utf-8")))
        fast = root / sub / "tokenizer.json"  # what fast tokenizers (and transformers 5) save
        if fast.is_file():
            data = json.loads(fast.read_text(encoding="utf-8"))
            vocab = (data.get("model") or {}).get("vocab") or {}
            # BPE/WordPiece: {piece: id}; Unigram (T5's sentencepiece): [[piece, score], ...]
            entries |= {v[0] for v in vocab} if isinstance(vocab, list) else set(vocab)
            entries |= {t["content"] for t in data.get("added_tokens") or [] if "content" in t}
        if entries:
            out[sub] = frozenset(entries)
    return out


@register_method
class TextualInversionConfig(TokenSettings, MethodConfig):
    name: Literal["textual_inversion"] = "textual_inversion"
    export_formats: ClassVar[frozenset[str]] = frozenset({"diffusers", "a1111"})

    def adds_tokens(self) -> bool:
        return True

    def trains_text_encoder(self) -> bool:
        return True

    @property
    def tokens(self) -> list[str]:
        """Trigger words (the export context lists them in metadata and the model card)."""
        return [self.token]

    def check_recipe(self, recipe) -> None:
        self.check_base(recipe.base, "method")
        self.template_check(recipe, "method")

    def build(self):
        return TextualInversionMethod(self)


class NewTokens:
    """New embedding rows in every text encoder: added, initialised, trained, and kept apart from the rest.

    `add` appends the rows to each tokenizer and embedding table; `train` swaps the encoder's input embedding
    for a `NewRowsEmbedding`, whose only trained parameter is the new rows ([num_vectors, dim], fp32). The
    old rows stay frozen in the compute dtype and get no gradient, so the optimizer, the clip norm, EMA and
    checkpoints see a few KB instead of the whole vocabulary.
    """

    def __init__(self, settings: TokenSettings, key: str):
        self.settings, self.key = settings, key
        self.ids: dict[str, list[int]] = {}  # text-encoder name -> ids of the new rows
        self.warned = False

    def add(self, comps) -> None:
        """Add the tokens to each tokenizer and rows to each text encoder, initialised from the initializer."""
        import torch

        words = self.settings.placeholder_tokens()
        for name, tok, enc in zip(comps.text_encoder_names, comps.tokenizers, comps.text_encoders, strict=True):
            self._check(tok, f"model.base '{comps.base.name}' ({name})")
            init = self._initializer_row(tok, enc)
            tok.add_tokens(words)
            rows = enc.get_input_embeddings().weight.shape[0]
            enc.resize_token_embeddings(max(len(tok), rows), mean_resizing=False)
            ids = tok.convert_tokens_to_ids(words)
            weight = enc.get_input_embeddings().weight
            with torch.no_grad():
                weight[ids] = init.to(weight.dtype)
            self.ids[name] = ids

    def _check(self, tok, where: str) -> None:
        from finetune.errors import ModelError

        vocab = {w.lower() for w in tok.get_vocab()}  # added tokens keep their case; CLIP matches lower-cased
        problem = self.settings.vocabulary_problem(vocab, where, self.key)
        if problem:
            raise ModelError(problem)

    def _initializer_row(self, tok, enc):
        from finetune.errors import ModelError

        ids = []
        for word in self.settings.initializer.split():
            pieces = tok(word, add_special_tokens=False).input_ids
            if len(pieces) != 1:  # averaging sub-word pieces gives a vector that means nothing
                raise ModelError(f"{self.key}.initializer: '{word}' is {len(pieces)} tokens, not one word of the "
                                 "vocabulary; use a common word (several words are averaged)")
            ids += pieces
        return enc.get_input_embeddings().weight[ids].detach().float().mean(0)

    def train(self, comps) -> list[str]:
        """Give each encoder its trainable new rows (after any adapter injection, which freezes the rest)."""
        from finetune.methods.new_rows import NewRowsEmbedding

        for name, enc in self._encoders(comps):
            enc.set_input_embeddings(NewRowsEmbedding(enc.get_input_embeddings(), self.ids[name]))
        return list(self.ids)

    def param_groups(self, comps, train_lr: float) -> list[dict]:
        # no weight decay: it would pull the new rows towards zero, away from the real words' scale
        lr = self.settings.lr or train_lr
        return [{"params": [enc.get_input_embeddings().rows], "lr": lr, "weight_decay": 0.0}
                for _, enc in self._encoders(comps)]

    def vectors(self, comps) -> dict[str, object]:
        """The trained rows by text-encoder name ([num_vectors, dim] each)."""
        return {name: enc.get_input_embeddings().rows.detach().clone() for name, enc in self._encoders(comps)}

    def prepare_captions(self, captions: list[str], keys: list[int] | None = None) -> list[str]:
        """Empty captions get a template; the token is expanded into its vectors ('<t>' -> '<t> <t>_1').

        A caption's template is drawn with its example's key (the trainer's per-example seed), so a resumed
        run, and any split of a step over processes and micro-batches, draws the same templates."""
        s = self.settings
        keys = list(range(len(captions))) if keys is None else keys
        out = []
        for text, key in zip(captions, keys, strict=True):
            if not text.strip() and s.templates != "none":
                text = random.Random(key).choice(TEMPLATES[s.templates]).format(s.token)
            out.append(expand_token(text, s.token, s.num_vectors))
        if not self.warned and not any(s.token.lower() in c.lower() for c in out):
            self.warned = True
            import warnings

            warnings.warn(f"{self.key}.token: no caption of this batch holds '{s.token}', so its vectors get "
                          "no gradient; put the token in the captions (caption template or trigger)", stacklevel=2)
        return out

    def _encoders(self, comps):
        return [(n, e) for n, e in zip(comps.text_encoder_names, comps.text_encoders, strict=True)
                if n in self.ids]


def expand_token(text: str, token: str, num_vectors: int) -> str:
    """What diffusers' maybe_convert_prompt does at inference ('<t>' -> '<t> <t>_1 ...'); CLIP ignores case."""
    if num_vectors == 1:
        return text
    expanded = " ".join([token] + [f"{token}_{i}" for i in range(1, num_vectors)])
    return re.sub(re.escape(token) + r"(?!_\d)", lambda _: expanded, text, flags=re.IGNORECASE)


class TextualInversionMethod:
    """Trains only the new token rows of every text encoder."""

    def __init__(self, config: TextualInversionConfig):
        self.config = config
        self.tokens = NewTokens(config, "method")

    def setup(self, comps, train_lr: float) -> list[dict]:
        self.tokens.add(comps)
        self.tokens.train(comps)
        return self.tokens.param_groups(comps, train_lr)

    def trained_modules(self) -> list[str]:
        return list(self.tokens.ids)

    def prepare_captions(self, captions: list[str], keys: list[int] | None = None) -> list[str]:
        return self.tokens.prepare_captions(captions, keys)

    def after_step(self, comps) -> None:
        pass

    def trainable_state(self, comps) -> dict:
        return {f"{name}.{self.config.token}": v for name, v in self.tokens.vectors(comps).items()}

    def export(self, comps, out_dir, ctx) -> list:
        from finetune.export.embeddings import save_embeddings

        formats = [f for f in ctx.formats if f in self.config.export_formats]
        return save_embeddings(self.tokens.vectors(comps), self.config.token, out_dir, ctx, formats=formats,
                               family=comps.family)
