"""SAM3's training objectives for one image and one text prompt.

As in DETR-family detectors (and SAM3's own training): the predicted queries
are matched one-to-one to the ground-truth instances by the Hungarian
algorithm on a cost of classification, mask and box terms; matched queries
learn their instance's mask (sigmoid focal + Dice) and box (L1 + generalised
IoU); every query's classification is a sigmoid focal loss (1 for matched,
0 for the rest); the image-level presence token learns whether the concept
is in the image at all. On a slice without the structure only presence and
classification are trained, towards "absent".
Weights follow Mask2Former / DETR conventions (mask 5, Dice 5, class 2,
L1 5, GIoU 2, presence 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torchvision.ops import generalized_box_iou, generalized_box_iou_loss


@dataclass(frozen=True)
class LossWeights:
    mask: float = 5.0
    dice: float = 5.0
    cls: float = 2.0
    l1: float = 5.0
    giou: float = 2.0
    presence: float = 1.0


def sigmoid_focal(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                  gamma: float = 2.0) -> torch.Tensor:
    """Element-wise sigmoid focal loss (Lin et al. 2017)."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    return (alpha * targets + (1 - alpha) * (1 - targets)) * loss


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-instance soft Dice loss of ``(k, h, w)`` logits against 0/1 targets."""
    prob = logits.sigmoid().flatten(1)
    flat = targets.flatten(1)
    numerator = 2 * (prob * flat).sum(1)
    return 1 - (numerator + 1) / (prob.sum(1) + flat.sum(1) + 1)


@torch.no_grad()
def match(pred_logits: torch.Tensor, pred_masks: torch.Tensor, pred_boxes: torch.Tensor,
          targets: torch.Tensor, target_boxes: torch.Tensor,
          weights: LossWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """Query index and target index of the minimum-cost one-to-one assignment."""
    q = pred_masks.float().flatten(1).sigmoid()  # (Q, hw)
    t = targets.flatten(1)  # (k, hw)
    dice_cost = 1 - (2 * q @ t.T + 1) / (q.sum(1)[:, None] + t.sum(1)[None, :] + 1)
    logits = pred_masks.float().flatten(1)
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    mask_cost = (pos @ t.T + neg @ (1 - t).T) / t.shape[1]
    cls_cost = -pred_logits.float().sigmoid()[:, None].expand(-1, t.shape[0])
    l1_cost = torch.cdist(pred_boxes.float(), target_boxes, p=1)
    giou_cost = -generalized_box_iou(pred_boxes.float(), target_boxes)
    cost = (weights.dice * dice_cost + weights.mask * mask_cost + weights.cls * cls_cost
            + weights.l1 * l1_cost + weights.giou * giou_cost)
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


def image_loss(pred_logits: torch.Tensor, pred_masks: torch.Tensor, pred_boxes: torch.Tensor,
               presence_logit: torch.Tensor, targets: torch.Tensor,
               target_boxes: torch.Tensor, weights: LossWeights | None = None
               ) -> dict[str, torch.Tensor]:
    """Loss terms for one image: ``pred_*`` of its Q queries, ``targets`` ``(k, h, w)``.

    Returns each weighted term and their sum under ``"total"``.
    """
    weights = weights or LossWeights()
    present = targets.shape[0] > 0
    presence = F.binary_cross_entropy_with_logits(
        presence_logit.float().reshape(1), torch.tensor([1.0 if present else 0.0],
                                                         device=presence_logit.device))
    cls_target = torch.zeros_like(pred_logits, dtype=torch.float32)
    terms = {"presence": weights.presence * presence}
    if present:
        targets = targets.to(pred_masks.device)
        target_boxes = target_boxes.to(pred_boxes.device)
        rows, cols = match(pred_logits, pred_masks, pred_boxes, targets, target_boxes, weights)
        cls_target[rows] = 1.0
        matched = pred_masks[rows].float()
        goal = targets[cols]
        terms["mask"] = weights.mask * sigmoid_focal(matched, goal).mean()
        terms["dice"] = weights.dice * dice_loss(matched, goal).mean()
        boxes = pred_boxes[rows].float()
        terms["l1"] = weights.l1 * F.l1_loss(boxes, target_boxes[cols])
        terms["giou"] = weights.giou * generalized_box_iou_loss(
            boxes, target_boxes[cols], reduction="mean")
    # focal loss summed over queries, normalised by the number of instances (DETR)
    norm = max(int(targets.shape[0]), 1)
    terms["cls"] = weights.cls * sigmoid_focal(pred_logits.float(), cls_target).sum() / norm
    terms["total"] = sum(terms.values(), torch.zeros((), device=pred_logits.device))
    return terms
