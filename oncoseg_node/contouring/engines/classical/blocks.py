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

from oncoseg_node.contouring.engines.classical.slabs import SLAB
from oncoseg_node.contouring.engines.classical.voxels import PackedMask
from oncoseg_node.contouring.mask_crop import EMPTY_BOX, Box, box_of, whole_box


@dataclass(frozen=True, eq=False)
class Block:
    """``array`` is the mask inside ``box`` of the volume; outside it, all False."""

    box: Box
    array: np.ndarray

    @classmethod
    def whole(cls, mask: np.ndarray) -> Block:
        """A full mask as the block on the whole grid (a view, not a copy)."""
        return cls(whole_box(mask.shape), mask)

    def full(self, shape: tuple[int, ...]) -> np.ndarray:
        """The whole mask; np.zeros leaves the pages outside the box untouched (no RSS)."""
        out = np.zeros(shape, dtype=bool)
        out[self.box] = self.array
        return out

    def rows(self, z0: int, z1: int) -> np.ndarray:
        """Slices ``z0:z1`` of the block (indices within its box): a view."""
        return self.array[z0:z1]

    def within(self, box: Box) -> np.ndarray:
        """The mask on ``box`` (any box of the volume), as a new array."""
        return _within(self, box)


class PackedBlock:
    """A block held as bits, eight voxels a byte, while it waits for the steps that read it.

    External at 400 slices is a 58 MiB block of booleans and 7 MiB of bits;
    the later steps read it a slab at a time (:meth:`rows`, :meth:`within`),
    so it is never whole again until :meth:`unpack`.
    """

    def __init__(self, block: Block | None) -> None:
        self.box: Box = EMPTY_BOX if block is None else block.box
        self.bits = PackedMask(np.zeros((0, 0, 0), dtype=bool) if block is None else block.array)

    def rows(self, z0: int, z1: int) -> np.ndarray:
        """Slices ``z0:z1`` of the block (indices within its box), as a new array."""
        return self.bits.slab(z0, z1)

    def within(self, box: Box) -> np.ndarray:
        """The mask on ``box`` (any box of the volume), as a new array."""
        return _within(self, box)

    def unpack(self) -> Block | None:
        """The block as booleans again; None when it holds nothing."""
        if self.bits.shape[0] == 0:
            return None
        return Block(self.box, self.bits.unpack())


def _within(block: Block | PackedBlock, box: Box) -> np.ndarray:
    """``block`` on ``box``: a new array, filled from the block's rows a slab at a time."""
    out = np.zeros(tuple(s.stop - s.start for s in box), dtype=bool)
    lo = [max(b.start, o.start) for b, o in zip(block.box, box, strict=True)]
    hi = [min(b.stop, o.stop) for b, o in zip(block.box, box, strict=True)]
    if not all(h > low for low, h in zip(lo, hi, strict=True)):
        return out
    origin = [s.start for s in block.box]
    ys, xs = (slice(lo[a] - origin[a], hi[a] - origin[a]) for a in (1, 2))
    into_y, into_x = (slice(lo[a] - box[a].start, hi[a] - box[a].start) for a in (1, 2))
    for z in range(lo[0], hi[0], SLAB):
        stop = min(z + SLAB, hi[0])
        out[z - box[0].start:stop - box[0].start, into_y, into_x] = (
            block.rows(z - origin[0], stop - origin[0])[:, ys, xs])
    return out


def rows_box(box: Box, part: slice) -> Box:
    """Slices ``part`` of the block on ``box`` (indices within it) as a volume box."""
    z = slice(box[0].start + part.start, min(box[0].start + part.stop, box[0].stop))
    return z, box[1], box[2]


def box_by_slab(origin: Box, shape: tuple[int, ...], part: Callable[[slice], np.ndarray],
                pad: int = 0) -> Box | None:
    """:func:`box_in` of the mask on ``origin`` that ``part(slices)`` gives a few slices
    at a time (``slices`` relative to ``origin``): the same box, with no block-sized
    temporary."""
    extent = tuple(s.stop - s.start for s in origin)
    hits = [np.zeros(n, dtype=bool) for n in extent]
    for z in range(0, extent[0], SLAB):
        mask = part(slice(z, z + SLAB))
        hits[0][z:z + SLAB] = mask.any(axis=(1, 2))
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
    return box_of(spans)


def tight(mask: np.ndarray, origin: Box | None = None,
          shape: tuple[int, ...] | None = None) -> Block | None:
    """A copy of ``mask`` (the block on ``origin``, or a full mask) on its bounding box."""
    origin = origin if origin is not None else whole_box(mask.shape)
    box = box_in(mask, origin, shape if shape is not None else mask.shape)
    if box is None:
        return None
    return Block(box, mask[tuple(slice(b.start - o.start, b.stop - o.start)
                                 for b, o in zip(box, origin, strict=True))].copy())


def inner(outer: Box, part: Box) -> Box:
    """``part`` (indices within the block on ``outer``) as volume indices."""
    return box_of(slice(o.start + p.start, o.start + p.stop)
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
    return box_of(spans)


def bbox(mask: np.ndarray, pad: int = 0) -> Box | None:
    """Bounding box of the set voxels, grown by ``pad`` in-plane; None when empty."""
    return box_in(mask, whole_box(mask.shape), mask.shape, pad)
