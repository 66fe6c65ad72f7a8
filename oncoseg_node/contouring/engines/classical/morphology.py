"""In-plane morphology: rectangles by shift-and-combine doubling, holes filled per slice.

Masks are ``(z, y, x)`` booleans. Morphology here is in-plane (each slice on
its own), because contours are drawn per slice and slice spacing is often
much coarser and non-uniform. Dilation and erosion use rectangles built by
shift-and-OR doubling, and hole filling labels the background a slab at a
time: both cost a few passes over memory instead of one scipy call per
slice, which is what keeps a 150-slice 512x512 series within seconds.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from oncoseg_node.contouring.engines.classical.labels import enclosed_in_slab
from oncoseg_node.contouring.engines.classical.slabs import each_slab, slab_starts, slab_views

# An edge's blur in pixels, not mm: partial volume spreads an edge over about one
# pixel whatever the pixel's size, so a rim of blur is one pixel at any spacing.
BLUR_PX = 1


def shift_in_place(out: np.ndarray, radius: int, axis: int, op: np.ufunc) -> None:
    """Combine each element of ``out`` with its neighbours up to ``radius`` along ``axis``.

    ``op`` is idempotent (or, and, maximum, minimum), so coverage can double each
    step; the window is cut at the array's ends.
    """
    done = 0
    while done < radius:
        # Offsets covered grow {-d..d} -> {-d-s..d+s} per step: log2(radius) steps.
        s = min(done + 1, radius - done)
        lo = [slice(None)] * out.ndim
        hi = [slice(None)] * out.ndim
        lo[axis], hi[axis] = slice(None, -s), slice(s, None)
        op(out[tuple(hi)], out[tuple(lo)], out=out[tuple(hi)])
        op(out[tuple(lo)], out[tuple(hi)], out=out[tuple(lo)])
        done += s


def _rectangle(mask: np.ndarray, ry: int, rx: int, op: np.ufunc, in_place: bool = False
               ) -> np.ndarray:
    out = mask if in_place else mask.copy()

    def step(part: np.ndarray) -> None:
        shift_in_place(part, ry, -2, op)
        shift_in_place(part, rx, -1, op)

    parts = slab_views(out)
    each_slab(lambda k: step(parts[k]), range(len(parts)))
    return out


def dilate(mask: np.ndarray, ry: int, rx: int, in_place: bool = False) -> np.ndarray:
    """In-plane dilation by a (2 ry + 1) x (2 rx + 1) rectangle; ``in_place`` dilates
    ``mask`` itself (a mask the caller needs no more: no second box)."""
    return _rectangle(mask, ry, rx, np.logical_or, in_place)


def erode(mask: np.ndarray, ry: int, rx: int, in_place: bool = False) -> np.ndarray:
    """In-plane erosion by a rectangle; voxels beyond the image edge count as set."""
    return _rectangle(mask, ry, rx, np.logical_and, in_place)


def opening(mask: np.ndarray, ry: int, rx: int) -> np.ndarray:
    """Removes structures thinner than the rectangle (couch shells, mask straps)."""
    out = dilate(erode(mask, ry, rx), ry, rx)
    out &= mask
    return out


class Spaced(Protocol):
    """A volume, or a box of one: what a distance in pixels is measured on."""

    @property
    def pixel_spacing(self) -> tuple[float, float]: ...


def radius_px(volume: Spaced, mm: float) -> tuple[int, int]:
    """A distance in mm as whole pixels along rows (y) and columns (x)."""
    return (int(round(mm / volume.pixel_spacing[0])), int(round(mm / volume.pixel_spacing[1])))


def fill_holes(mask: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Fill, on each slice, background not connected to that slice's border.

    Holes are per slice, so slabs of slices are labelled one at a time (their
    labels stay in cache). ``out`` (``mask`` itself allowed) receives the result.
    """
    if out is None:
        out = mask.copy()
    elif out is not mask:
        out[...] = mask

    def step(z: int) -> None:
        found = enclosed_in_slab(mask, z)
        if found is not None:
            where, labels, inside = found
            out[where] |= inside[labels]

    each_slab(step, slab_starts(mask))
    return out


