"""One file per model family; importing this package registers them all (see finetune/models/family.py)."""

from finetune.models.families import flux, sd, sd3, sdxl  # noqa: F401
