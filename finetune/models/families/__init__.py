"""One file per model family; importing this package registers them all (see finetune/models/family.py)."""

from finetune.models.families import flux, flux2_klein, qwen_image, sd, sd3, sdxl, wan, z_image  # noqa: F401
