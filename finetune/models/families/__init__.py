"""The registry of model families: one file per family in this folder, and this list of them all.

`FAMILIES` maps each name (what `model.family` and `--family` take) to its `Family` object, in this order;
detection (finetune/models/detect.py) asks them by `priority`, ties in this order. Adding a family is its file
here plus one line in `REGISTERED` (docs/adding-a-family.md). Nothing here imports torch.
"""

from __future__ import annotations

from finetune.models.families.chroma import CHROMA
from finetune.models.families.flux import FLUX
from finetune.models.families.flux2_dev import FLUX2_DEV
from finetune.models.families.flux2_klein import FLUX2_KLEIN
from finetune.models.families.flux_control import FLUX_CONTROL
from finetune.models.families.flux_controlnet import FLUX_CONTROLNET
from finetune.models.families.flux_kontext import FLUX_KONTEXT
from finetune.models.families.hidream import HIDREAM
from finetune.models.families.hunyuanimage import HUNYUANIMAGE
from finetune.models.families.krea2 import KREA2
from finetune.models.families.lumina2 import LUMINA2
from finetune.models.families.qwen_image import QWEN_IMAGE
from finetune.models.families.qwen_image21 import QWEN_IMAGE21
from finetune.models.families.qwen_image_edit import QWEN_IMAGE_EDIT, QWEN_IMAGE_EDIT_PLUS
from finetune.models.families.sana import SANA
from finetune.models.families.sd import SD1, SD2
from finetune.models.families.sd3 import SD3
from finetune.models.families.sdxl import SDXL
from finetune.models.families.unet_controlnet import SD1_CONTROLNET, SDXL_CONTROLNET
from finetune.models.families.wan import WAN, WAN_I2V
from finetune.models.families.z_image import Z_IMAGE
from finetune.models.family import Family

REGISTERED: tuple[Family, ...] = (FLUX, FLUX2_KLEIN, FLUX_CONTROL, FLUX_CONTROLNET, FLUX_KONTEXT, QWEN_IMAGE,
                                  QWEN_IMAGE_EDIT, QWEN_IMAGE_EDIT_PLUS, SD1, SD1_CONTROLNET, SD2, SD3, SDXL,
                                  SDXL_CONTROLNET, WAN, WAN_I2V, Z_IMAGE, CHROMA, FLUX2_DEV, LUMINA2, SANA, KREA2,
                                  HIDREAM, HUNYUANIMAGE, QWEN_IMAGE21)


def _by_name(families: tuple[Family, ...]) -> dict[str, Family]:
    """Name -> family; a name given twice (or the reserved 'auto') is refused."""
    out: dict[str, Family] = {}
    for family in families:
        if family.name in out or family.name == "auto":
            raise ValueError(f"family {family.name!r} is registered twice (or uses the reserved name 'auto')")
        out[family.name] = family
    return out


FAMILIES: dict[str, Family] = _by_name(REGISTERED)
