"""One file per model family; importing this package registers them all (see finetune/models/family.py)."""

from finetune.models.families import (  # noqa: F401
    flux,
    flux2_klein,
    flux_kontext,
    qwen_image,
    qwen_image_edit,
    sd,
    sd3,
    sdxl,
    z_image,
)
