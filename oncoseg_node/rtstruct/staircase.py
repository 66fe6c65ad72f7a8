"""Pixel-edge contours with their staircases straightened, losslessly for the mask.

A contour traced along pixel edges has two vertices for every step of a
sloping boundary. What a planning system (and our reader) rasterises from
a contour is which pixel centres it encloses, and that depends only on where
the contour crosses each line of pixel centres (y = row + 0.5 in corner
coordinates). A pixel-edge contour crosses such a line only on its vertical
edges, at the edge's x. So each vertical edge is replaced by the points where
it crosses the centre lines of its first and last row (one point for a
one-row edge), the horizontal edges between them are dropped except at a
turn of direction in y (the top and bottom of a region), where the edge and
its corners are kept, and points that then lie on a straight line with their
neighbours are merged. Every centre line is crossed at exactly the x it was
crossed before, so the rasterised mask is identical; a regular staircase
becomes one straight segment, and the enclosed area stays that of the
pixels to within the half-pixel triangles that cancel along each step.

All loops of a volume are handled at once, as concatenated arrays.
"""

from __future__ import annotations

import numpy as np


def _cyclic(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of each point's successor and predecessor within its own loop."""
    ends = np.cumsum(counts)
    firsts = ends - counts
    n = int(ends[-1]) if len(ends) else 0
    successor = np.arange(1, n + 1)
    successor[ends - 1] = firsts
    predecessor = np.arange(-1, n - 1)
    predecessor[firsts] = ends - 1
    return successor, predecessor


def straighten(vertices: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Straightened loops for concatenated pixel-edge loops (corner coordinates).

    ``vertices`` holds every loop's turning corners in order, ``counts`` the
    number of vertices of each loop (consecutive edges alternate between
    horizontal and vertical). Returns the new vertices and counts.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if not len(counts):
        return vertices, counts
    successor, predecessor = _cyclic(counts)
    edge = vertices[successor] - vertices
    step = np.sign(edge[:, 1])
    vertical = step != 0
    # a horizontal edge is kept where the boundary turns back in y around it
    turn = ~vertical & (step[predecessor] != step[successor])
    rows = np.abs(edge[:, 1])
    emitted = np.where(vertical, np.where(rows >= 2, 2, 1), np.where(turn, 2, 0))
    source = np.repeat(np.arange(len(vertices)), emitted)
    slot = np.arange(len(source)) - np.repeat(np.cumsum(emitted) - emitted, emitted)
    half = np.stack([np.zeros(len(source)), 0.5 * step[source]], axis=1)
    at_start = vertices[source]
    at_end = vertices[successor[source]]
    first = np.where(vertical[source, None], at_start + half, at_start)
    second = np.where(vertical[source, None], at_end - half, at_end)
    # slot 0 of a one-row edge is already its midpoint
    points = np.where((slot == 0)[:, None], first, second)
    loop_of_point = np.repeat(np.arange(len(counts)), counts)[source]
    new_counts = np.bincount(loop_of_point, minlength=len(counts))
    # merge points on a straight line through their neighbours (exact: all
    # coordinates are multiples of 0.5)
    after, before = _cyclic(new_counts)
    a = points - points[before]
    b = points[after] - points
    straight = (a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0] == 0) & (np.einsum("ij,ij->i", a, b) > 0)
    keep = ~straight
    final_counts = np.bincount(loop_of_point[keep], minlength=len(counts))
    return points[keep], final_counts
