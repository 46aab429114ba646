"""Evaluation prompts: the DreamBench-style sets shipped in prompt_sets.yaml, and how a prompt is read for
each metric (which prompts show the subject, what CLIP reads for CLIP-T). PyYAML only: cheap to import."""

from __future__ import annotations

import functools
import re
from pathlib import Path

SETS_FILE = Path(__file__).resolve().parent / "prompt_sets.yaml"


@functools.cache
def prompt_sets() -> dict[str, dict[str, list[str]]]:
    """{set name: {kind: [prompt with '{}' for the subject, ...]}}."""
    import yaml

    return yaml.safe_load(SETS_FILE.read_text(encoding="utf-8"))


def subject_phrase(class_word: str, token: str | None = None) -> str:
    """What '{}' becomes: 'sks dog' with a token, 'dog' without."""
    return f"{token} {class_word}" if token else class_word


def expand(name: str, class_word: str, token: str | None = None) -> list[str]:
    """The prompts of set `name` with the subject filled in, in file order (recontextualisation first)."""
    sets = prompt_sets()
    if name not in sets:
        raise KeyError(name)
    phrase = subject_phrase(class_word, token)
    return [p.replace("{}", phrase) for kind in sets[name].values() for p in kind]


def _has_word(prompt: str, token: str) -> bool:
    return re.search(rf"(?<![\w<>]){re.escape(token)}(?![\w<>])", prompt) is not None


def shows_subject(prompt: str, token: str | None) -> bool:
    """Subject prompts are the ones with the trigger token; with no token every prompt counts."""
    return token is None or _has_word(prompt, token)


def clip_text(prompt: str, token: str | None, class_word: str | None = None) -> str:
    """The prompt as CLIP reads it for CLIP-T: the trigger token means nothing to CLIP, so it is dropped
    ('a sks dog in the snow' -> 'a dog in the snow'), or replaced by the class word when it stands alone
    ('a photo of <cat-toy>' -> 'a photo of toy')."""
    if not token or not _has_word(prompt, token):
        return prompt
    pattern = rf"(?<![\w<>]){re.escape(token)}(?![\w<>])"
    if class_word and re.search(pattern + rf"\s+{re.escape(class_word)}\b", prompt):
        text = re.sub(pattern + r"\s+", "", prompt)
    else:
        text = re.sub(pattern, class_word or "", prompt)
    return " ".join(text.split())
