"""Captions without typing: caption a folder of images with a vision-language model transformers runs natively.

    from finetune.caption import CaptionOptions, caption_folder
    result = caption_folder("photos/", CaptionOptions(style="short", trigger="sks", class_words=("dog",)))
    result.written   # [(caption file, caption), ...]; result.to_dict() for JSON

    captioner = load_captioner(model_id)                       # load once, caption many folders
    caption_folder(folder, opts, captioner=captioner, progress=False, echo=on_line, stop=should_stop)

`tools/caption.py` is the command line over the same call; `finetune.data.hygiene.check_folder` checks a
folder. Importing this package is cheap: torch and transformers load with the first model.
"""

from __future__ import annotations

from finetune.caption.models import DEFAULT_MODELS, STYLES, Captioner, load_captioner
from finetune.caption.run import CaptionOptions, CaptionResult, caption_folder, summary

__all__ = ["DEFAULT_MODELS", "STYLES", "CaptionOptions", "CaptionResult", "Captioner", "caption_folder",
           "load_captioner", "summary"]
