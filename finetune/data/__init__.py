"""Captioned image sets: sources -> records -> caption rules -> buckets -> transforms -> caches.

    data = build_train_data(recipe, latent_encoder=..., latent_key=...)
    for batch in data.loader(epoch): ...

Importing this package is cheap (no torch): `build_train_data` and `TrainData` load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from finetune.data.dataset import TrainData, build_train_data

__all__ = ["TrainData", "build_train_data", "check_data", "class_image_files", "count_class_images"]


def __getattr__(name: str):
    if name in ("TrainData", "build_train_data"):
        from finetune.data import dataset

        return getattr(dataset, name)
    if name == "check_data":
        from finetune.data.check import check_data

        return check_data
    if name in ("class_image_files", "count_class_images"):
        from finetune.data import scan

        return getattr(scan, name)
    raise AttributeError(f"module 'finetune.data' has no attribute {name!r}")
