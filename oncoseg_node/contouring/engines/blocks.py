"""A mask held as the block of the volume it lies in, and boxes found within blocks.

A full mask of a 400 x 512 x 512 series is 100 MiB while a lung fills a
tenth of it: the classical engine keeps each step's output as a
:class:`Block` (its box in volume indices and the boolean array inside),
and searches later steps only inside the blocks of earlier ones. Boxes are
tuples of ``start:stop`` slices on ``(z, y, x)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Box = tuple[slice, ...]


@dataclass(frozen=True, eq=False)
class Block:
    """``array`` is the mask inside ``box`` of the volume; outside it, all False."""

    box: Box
    array: np.ndarray

    def full(self, shape: tuple[int, ...]) -> np.ndarray:
        """The whole mask; np.zeros leaves the pages outside the box untouched (no RSS)."""
        out = np.zeros(shape, dtype=bool)
        out[self.box] = self.array
        return out

    def within(self, box: Box) -> np.ndarray:
        """The mask on ``box`` (any box of the volume), as a new array."""
        out = np.zeros(tuple(s.stop - s.start for s in box), dtype=bool)
        lo = [max(b.start, o.start) for b, o in zip(self.box, box, strict=True)]
        hi = [min(b.stop, o.stop) for b, o in zip(self.box, box, strict=True)]
        if all(h > low for low, h in zip(lo, hi, strict=True)):
            into = tuple(slice(a - o.start, b - o.start)
                         for a, b, o in zip(lo, hi, box, strict=True))
            take = tuple(slice(a - s.start, b - s.start)
                         for a, b, s in zip(lo, hi, self.box, strict=True))
            out[into] = self.array[take]
        return out


def box_by_slab(origin: Box, shape: tuple[int, ...], part: Callable[[slice], np.ndarray],
                pad: int = 0, slab: int = 16) -> Box | None:
    """:func:`box_in` of the mask on ``origin`` that ``part(slices)`` gives a few slices
    at a time (``slices`` relative to ``origin``): the same box, with no block-sized
    temporary."""
    extent = tuple(s.stop - s.start for s in origin)
    hits = [np.zeros(n, dtype=bool) for n in extent]
    for z in range(0, extent[0], slab):
        mask = part(slice(z, z + slab))
        hits[0][z:z + slab] = mask.any(axis=(1, 2))
        plane = np.logical_or.reduce(mask, axis=0)
        hits[1] |= plane.any(axis=1)
        hits[2] |= plane.any(axis=0)
    spans = []
    for axis, hit in enumerate(hits):
        where = np.flatnonzero(hit)
        if where.size == 0:
            return None
        p = pad if axis > 0 else 0
        lo, hi = origin[axis].start + int(where[0]), origin[axis].start + int(where[-1]) + 1
        spans.append(slice(max(lo - p, 0), min(hi + p, shape[axis])))
    return tuple(spans)


def tight(mask: np.ndarray, origin: Box | None = None,
          shape: tuple[int, ...] | None = None) -> Block | None:
    """A copy of ``mask`` (the block on ``origin``, or a full mask) on its bounding box."""
    origin = origin if origin is not None else tuple(slice(0, n) for n in mask.shape)
    box = box_in(mask, origin, shape if shape is not None else mask.shape)
    if box is None:
        return None
    return Block(box, mask[tuple(slice(b.start - o.start, b.stop - o.start)
                                 for b, o in zip(box, origin, strict=True))].copy())


def inner(outer: Box, part: Box) -> Box:
    """``part`` (indices within the block on ``outer``) as volume indices."""
    return tuple(slice(o.start + p.start, o.start + p.stop)
                 for o, p in zip(outer, part, strict=True))


def box_in(mask: np.ndarray, origin: Box, shape: tuple[int, ...],
           pad: int | tuple[int, ...] = 0) -> Box | None:
    """Bounding box (volume indices) of ``mask``, the block on ``origin``; None if empty.

    Grown by ``pad`` in-plane (or by ``pad[axis]`` along each axis) and clamped
    to the volume's ``shape``, not the block's, so it equals ``bbox`` of the
    full mask whatever block it is found in.
    """
    pads = (0, pad, pad) if isinstance(pad, int) else tuple(pad)
    spans = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=others))
        if hit.size == 0:
            return None
        p = pads[axis]
        lo, hi = origin[axis].start + int(hit[0]), origin[axis].start + int(hit[-1]) + 1
        spans.append(slice(max(lo - p, 0), min(hi + p, shape[axis])))
    return tuple(spans)
