"""Control fidelity: how well an output follows its control image, the score beside the usual metrics for
control runs (data.control.compute says which control it is):

- 'toy_mask': the IoU of the output's object mask (the same toy mask, its largest region) with the control mask;
- 'canny' (and any edge map): the F1 of the output's Canny edges against the control's edges, an edge counting
  as matched within `tolerance` pixels (the usual boundary F1 of edge detection benchmarks).
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def as_mask(img: Image.Image | np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """A white-on-black control image (or a float mask) as booleans."""
    arr = np.asarray(img, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr.mean(axis=2)
    if arr.max() > 1.0:
        arr = arr / 255.0
    return arr > threshold


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _grow(mask: np.ndarray, tolerance: int) -> np.ndarray:
    import cv2

    size = 2 * tolerance + 1
    return cv2.dilate(mask.astype(np.uint8), np.ones((size, size), np.uint8)) > 0


def edge_f1(edges: np.ndarray, control: np.ndarray, tolerance: int = 1) -> float:
    """F1 of an output's edge pixels against the control's: precision = output edges near a control edge,
    recall = control edges near an output edge (within `tolerance` pixels)."""
    if not edges.any() and not control.any():
        return 1.0
    if not edges.any() or not control.any():
        return 0.0
    precision = float((edges & _grow(control, tolerance)).sum() / edges.sum())
    recall = float((control & _grow(edges, tolerance)).sum() / control.sum())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def fidelity(output: Image.Image, control: Image.Image, compute: str, low: int = 100, high: int = 200) -> float:
    """The control-fidelity score of one output for a control image made by `compute` (data.control)."""
    from finetune.data.control import canny

    if compute == "toy_mask":
        from finetune.data.control import toy_mask

        return mask_iou(largest_component(as_mask(toy_mask(output))), as_mask(control))
    return edge_f1(as_mask(canny(output, low, high)), as_mask(control))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of a mask: the object, without stray speckles of a generated image."""
    import cv2

    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 1:
        return mask.astype(bool)
    return labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def row_scores(control_cfg, inputs: list[list[Image.Image]], rows: list[list[Image.Image]], prompts: list[str]
               ) -> dict[str, float]:
    """Validation pairs: each prompt's mean fidelity over its seeds to its row's control image (data.control says
    which kind), and their mean ('mean')."""
    scores = {}
    for prompt, (control, *_), outs in zip(prompts, inputs, rows, strict=True):
        control = control.resize(outs[0].size, Image.Resampling.NEAREST)
        scores[prompt] = sum(fidelity(o, control, control_cfg.compute, control_cfg.low, control_cfg.high)
                             for o in outs) / len(outs)
    scores["mean"] = sum(scores.values()) / len(prompts)
    return scores
