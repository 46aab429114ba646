"""Control fidelity (finetune/eval/control.py): mask IoU and edge F1 on known images, and each control kind's score
of an output that follows its control against one that does not."""

from __future__ import annotations

import numpy as np


def box(top: int, left: int, side: int = 20, size: int = 64) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[top : top + side, left : left + side] = True
    return m


def test_mask_iou_counts_overlap_over_union():
    from finetune.eval.control import mask_iou

    assert mask_iou(box(10, 10), box(10, 10)) == 1.0
    assert abs(mask_iou(box(10, 10), box(10, 20)) - 200 / 600) < 1e-9  # half overlaps: 10x20 of 20x30
    assert mask_iou(box(0, 0), box(40, 40)) == 0.0


def test_edge_f1_forgives_the_tolerance_and_no_more():
    from finetune.eval.control import edge_f1

    edges = np.zeros((64, 64), bool)
    edges[20, 10:50] = True
    assert edge_f1(edges, edges) == 1.0
    assert edge_f1(np.roll(edges, 1, axis=0), edges, tolerance=1) == 1.0
    assert edge_f1(np.roll(edges, 3, axis=0), edges, tolerance=1) == 0.0
    half = edges.copy()
    half[20, 30:50] = False  # every output edge is right; 21 of the control's 40 are found (one by tolerance)
    recall = 21 / 40
    assert abs(edge_f1(half, edges) - 2 * recall / (1 + recall)) < 1e-9


def test_fidelity_scores_an_output_that_follows_its_control_above_one_that_does_not():
    from finetune.data.control import canny, toy_mask
    from finetune.eval.control import fidelity
    from finetune.toy import world

    here = world.draw("square", "red", "white", 20, 20, 12)
    there = world.draw("square", "red", "white", 44, 44, 12)
    assert fidelity(here, toy_mask(here), "toy_mask") > 0.9
    assert fidelity(there, toy_mask(here), "toy_mask") < 0.1
    assert fidelity(here, canny(here), "canny") == 1.0
    assert fidelity(there, canny(here), "canny") < 0.2
