"""Paired organs compete for pixels: left and right parotid never overlap.

SAM3's own loop keeps its objects apart by giving each pixel to the object
with the highest mask logit; the node does the same for the two sides of a
paired organ (TG-263 names ``X_L`` and ``X_R`` with their laterality), which
are followed by separate tracker sessions and could otherwise both claim
the midline or a drifting neighbour.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from oncoseg_node.contouring.engines.sam3.track import Track
from oncoseg_node.contouring.protocols import Structure

LOSER_LOGIT = -0.1  # just across zero, so the contour elsewhere keeps the model's own edge
SIDE_SUFFIXES = {"left": "_L", "right": "_R"}


def pair_key(structure: Structure) -> str | None:
    """The organ a sided structure is one side of (``Parotid`` for ``Parotid_L``), else None."""
    suffix = SIDE_SUFFIXES.get(structure.laterality or "")
    if suffix is None or not structure.name.endswith(suffix) or len(structure.name) <= 2:
        return None
    return structure.name[: -len(suffix)]


def compete(tracks: Sequence[Track]) -> int:
    """Give each pixel claimed by several tracks to the highest logit; pixels moved.

    Tracks are changed in place; their logits share one model-frame grid.
    """
    moved = 0
    slices = sorted(set().union(*(t.logits for t in tracks)))
    for z in slices:
        present = [t for t in tracks if z in t.logits]
        if len(present) < 2:
            continue
        stack = np.stack([t.logits[z] for t in present])
        winner = stack.argmax(0)
        for k, track in enumerate(present):
            lost = (stack[k] > 0) & (winner != k)
            if lost.any():
                track.logits[z] = np.where(lost, np.minimum(stack[k], LOSER_LOGIT),
                                           stack[k]).astype(np.float32)
                moved += int(lost.sum())
    return moved
