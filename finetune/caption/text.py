"""From a model's answer to the caption file's text: tidy, bind the subject to its trigger word, add prefix/suffix.

    finish("The image shows a dog on grass.", "short", trigger="sks", class_words=["dog"], prefix="photo of ")
    -> "photo of a sks dog on grass."
"""

from __future__ import annotations

import re
from dataclasses import dataclass

STYLES = ("short", "detailed", "tags")  # what a caption can be; here, below the captioners that all offer them

# Openers VLMs like to add; they spend CLIP tokens on nothing.
_LEAD_IN = re.compile(
    r"^\s*(?:in\s+)?(?:the|this)\s+(?:image|picture|photo(?:graph)?|illustration|painting|artwork)\s+"
    r"(?:shows|depicts|features|displays|contains|presents|captures|is\s+of|we\s+see)\s*:?\s+",
    re.IGNORECASE,
)
_ARTICLE = re.compile(r"^(?:A|An|The)(?=\s)")
_TAG_NOISE = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s*")  # bullets and numbering some models put before tags


@dataclass(frozen=True)
class Binding:
    """What to put around a generated caption. `trigger` + `class_words`: the first class word in the caption
    becomes `trigger class_word` ("a dog" -> "a sks dog"); when none occurs, "trigger class_word, " leads."""

    prefix: str = ""
    suffix: str = ""
    trigger: str | None = None
    class_words: tuple[str, ...] = ()


def tidy(text: str, style: str) -> str:
    """One line, no lead-in, no quotes around it; tags deduplicated and comma-separated."""
    if style == "tags":
        return tidy_tags(text)
    text = " ".join(text.split()).strip().strip('"').strip()
    return _LEAD_IN.sub("", text, count=1)


def tidy_tags(text: str) -> str:
    seen: dict[str, None] = {}
    for part in re.split(r"[,\n;]", text):
        tag = " ".join(_TAG_NOISE.sub("", part).split()).strip('."').strip().lower()
        if tag:
            seen.setdefault(tag, None)
    return ", ".join(seen)


def bind(caption: str, trigger: str | None, class_words: tuple[str, ...] = ()) -> str:
    """Put the trigger word in front of the first class word (plurals included), or lead with it."""
    if not trigger or re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption):
        return caption
    words = sorted(class_words, key=len, reverse=True)  # "golden retriever" before "retriever"
    if words:
        pattern = r"(?<!\w)(" + "|".join(re.escape(w) for w in words) + r")(?:e?s)?(?!\w)"
        m = re.search(pattern, caption, re.IGNORECASE)
        if m:
            return f"{caption[:m.start()]}{trigger} {caption[m.start():]}"
        return f"{trigger} {class_words[0]}, {caption}" if caption else f"{trigger} {class_words[0]}"
    return f"{trigger}, {caption}" if caption else trigger


def finish(raw: str, style: str, binding: Binding) -> str:
    """The text that goes into the caption file ('' when the model said nothing usable)."""
    caption = tidy(raw, style)
    if not caption:
        return ""
    if binding.prefix or binding.trigger:  # it no longer starts the sentence: "photo of a dog", not "photo of A dog"
        caption = _ARTICLE.sub(lambda m: m.group(0).lower(), caption, count=1)
    caption = bind(caption, binding.trigger, binding.class_words)
    return f"{binding.prefix}{caption}{binding.suffix}".strip()
