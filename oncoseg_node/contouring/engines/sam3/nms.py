"""Detection NMS and mask clean-up for SAM3, done here rather than by a hub kernel.

transformers' SAM3 video code fetches a compiled helper (cv-utils) from the
hub at run time for mask NMS and hole filling; offline it only logs a warning
and skips both, so a slice shows 8-16 overlapping objects instead of 1-2.
The node never takes that path: these functions are always applied.
``torchvision.ops.nms`` is no substitute: it suppresses by box overlap, and
two organs can share a box while their masks barely touch.

Memory is bounded: pairwise mask IoU is computed as a matrix product of
flattened masks, ``O(n * pixels + n^2)``, never the ``n x n x pixels``
intersection array, and ``n`` is capped by ``max_candidates``.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

IOU_CHUNK = 64  # rows of the IoU matrix computed per matmul, bounds the transient memory


def pairwise_mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every mask in ``a`` ``(n, h, w)`` with every mask in ``b`` ``(m, h, w)``.

    Counted in float32: bfloat16 cannot hold pixel counts above 256 exactly.
    """
    fa = a.reshape(a.shape[0], -1).float()
    fb = b.reshape(b.shape[0], -1).float()
    area_a, area_b = fa.sum(1), fb.sum(1)
    inter = torch.cat([fa[i:i + IOU_CHUNK] @ fb.T for i in range(0, fa.shape[0], IOU_CHUNK)]
                      or [fa.new_zeros(0, fb.shape[0])])
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / union.clamp(min=1.0)


def mask_nms(masks: torch.Tensor, scores: torch.Tensor, iou_threshold: float, *,
             max_keep: int, max_candidates: int) -> torch.Tensor:
    """Greedy mask NMS: indices into ``masks`` of the kept detections, best first.

    ``masks`` is boolean ``(n, h, w)``. Only the ``max_candidates`` best-scoring
    non-empty masks are considered, and at most ``max_keep`` are returned, so
    the object count per slice is bounded whatever the score threshold.
    """
    if masks.shape[0] == 0 or max_keep <= 0:
        return torch.zeros(0, dtype=torch.long, device=masks.device)
    nonempty = masks.flatten(1).any(1)
    order = torch.argsort(scores.float(), descending=True, stable=True)
    order = order[nonempty[order]][:max_candidates]
    if order.numel() == 0:
        return order
    iou = pairwise_mask_iou(masks[order], masks[order]).cpu()
    suppressed = torch.zeros(order.numel(), dtype=torch.bool)
    keep: list[int] = []
    for i in range(order.numel()):
        if suppressed[i]:
            continue
        keep.append(i)
        if len(keep) >= max_keep:
            break
        suppressed |= iou[i] > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]


def clean_mask_logits(logits: np.ndarray, max_area: int) -> np.ndarray:
    """Fill small holes and drop small specks of a ``(h, w)`` mask-logit map.

    Holes (background components not touching the border) and specks
    (foreground components other than the largest) of at most ``max_area``
    pixels are flipped by setting their logits just across zero, so the
    resized contour still follows the model's own boundary elsewhere. The
    largest component is always kept: a small organ is not a speck.
    """
    out = np.array(logits, dtype=np.float32, copy=True)
    if max_area <= 0:
        return out
    fg = out > 0
    labels, count = ndimage.label(fg)
    if count > 1:
        areas = np.bincount(labels.ravel(), minlength=count + 1)
        areas[0] = 0
        largest = int(areas.argmax())
        small = (areas <= max_area) & (np.arange(count + 1) != largest)
        small[0] = False
        out[small[labels]] = -0.1
    bg = out <= 0
    labels, count = ndimage.label(bg)
    if count:
        areas = np.bincount(labels.ravel(), minlength=count + 1)
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        small = areas <= max_area
        small[0] = False
        small[border] = False
        out[small[labels]] = 0.1
    return out
