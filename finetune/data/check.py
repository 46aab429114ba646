"""`python -m finetune RECIPE --check`: scan the data and say what training would see.

PIL only: this must not import torch or load a model, so a user can check a dataset in seconds.
"""

from __future__ import annotations

from finetune.data.plan import Planner
from finetune.data.scan import count_class_images, scan_data, summarize


def check_data(recipe) -> str:
    """The data summary for `--check`: images per subset, repeats, buckets, sample captions after the
    rules, problems found. Fatal problems raise DataError; with on_bad_image: skip, bad files are counted."""
    data = recipe.data
    scan = scan_data(data, verbose=True, need_prior=False)
    bs, accum = recipe.train.batch_size, recipe.train.gradient_accumulation
    planner = Planner(scan, bs, recipe.train.seed, accumulation=accum)
    extra = [f"optimizer steps per epoch on one process (batch size {bs} x {accum} accumulated, one bucket "
             f"per batch): {planner.total_batches}"]
    from finetune.eval.references import reference_summary

    extra += reference_summary(recipe)  # the metrics' reference images, read with the run's own rules
    if data.prior is not None:
        missing = data.prior.num_class_images - count_class_images(data.prior)
        if missing > 0:
            extra.append(f"class images to generate before training: {missing} (into {data.prior.class_dir})")
    return summarize(scan, recipe.train.seed, extra)
