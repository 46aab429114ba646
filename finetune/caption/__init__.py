"""Captions without typing: caption a folder of images with a vision-language model transformers runs natively.

    from finetune.caption import CaptionOptions, caption_folder
    result = caption_folder("photos/", CaptionOptions(style="short", trigger="sks", class_words=("dog",)))
    result.written   # [(caption file, caption), ...]

`tools/caption.py` is the command line over the same call. Importing this package is cheap: torch and
transformers load with the first model.
"""

from __future__ import annotations

from finetune.caption.run import CaptionOptions, CaptionResult, caption_folder, summary

__all__ = ["CaptionOptions", "CaptionResult", "caption_folder", "summary"]
