"""Caption rules: template, tag shuffling with kept leading tags, caption dropout and tag dropout.

The template is applied first, so `keep_tokens` counts tags of the finished caption: with
`template: "{trigger}, {caption}"` and `keep_tokens: 1` the trigger word never moves or drops.
Randomness comes from `rng_for(seed, epoch, index)`, so a resumed run sees the same captions.
"""

from __future__ import annotations

import hashlib
import random

from finetune.data.config import CaptionRules


def rng_for(*parts: object) -> random.Random:
    """A Random seeded from the parts through a stable hash (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def _joiner(sep: str) -> str:
    return sep if sep.isspace() else sep + " "


def _tidy(text: str, sep: str) -> str:
    """Strip spaces and dangling separators left by an empty {caption} or {trigger}."""
    return text.strip().strip(sep).strip() if not sep.isspace() else " ".join(text.split())


def apply_rules(caption: str, rules: CaptionRules, rng: random.Random | None = None) -> str:
    """The training caption for one sighting of an image. Without an rng, only the template applies
    (what caches and summaries of fixed captions use)."""
    text = _tidy(rules.template.format(caption=caption.strip(), trigger=rules.trigger or ""), rules.separator)
    if rng is None or not rules.varies:
        return text
    # draw in a fixed order so each rule's randomness does not depend on whether another is on
    drop_caption = rng.random() < rules.caption_dropout
    if not (rules.shuffle_tags or rules.tag_dropout > 0):
        return "" if drop_caption else text
    tags = [t.strip() for t in text.split(rules.separator)]
    tags = [t for t in tags if t]
    kept, rest = tags[: rules.keep_tokens], tags[rules.keep_tokens :]
    if rules.tag_dropout > 0:
        rest = [t for t in rest if rng.random() >= rules.tag_dropout]
    if rules.shuffle_tags:
        rng.shuffle(rest)
    if drop_caption:
        return ""
    return _joiner(rules.separator).join(kept + rest)
