"""A mask held as the block of the volume it lies in, and boxes found within blocks.

A full mask of a 400 x 512 x 512 series is 100 MiB while a lung fills a
tenth of it: the classical engine keeps each step's output as a
:class:`Block` (its box in volume indices and the mask inside, as booleans
or bits), and searches later steps only inside the blocks of earlier ones.
Boxes are :data:`~oncoseg_node.contouring.mask_crop.Box`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from oncoseg_node.contouring.engines.classical.slabs import SLAB
from oncoseg_node.contouring.engines.classical.voxels import PackedMask
from oncoseg_node.contouring.mask_crop import EMPTY_BOX, Box, MaskCrop, box_of, whole_box


@dataclass(frozen=True, eq=False)
class Block:
    """A mask as its box of the volume and what lies inside it, as booleans or as bits.

    Outside ``box`` the mask is all False. Every step returns its masks as
    blocks and reads earlier ones through :meth:`rows` (a slab at a time) and
    :meth:`within` (on a box of its own), however they are held. A block that
    waits for later steps is held as bits (:meth:`packed`): External at 400
    slices is a 58 MiB block of booleans and 7 MiB of bits, and read a slab at
    a time it is never whole again until :meth:`unpack`.
    """

    box: Box
    held: np.ndarray | PackedMask

    @classmethod
    def whole(cls, mask: np.ndarray) -> Block:
        """A full mask as the block on the whole grid (a view, not a copy)."""
        return cls(whole_box(mask.shape), mask)

    @property
    def array(self) -> np.ndarray:
        """The booleans inside ``box``: the block's own, or unpacked anew from its bits."""
        held = self.held
        return held.unpack() if isinstance(held, PackedMask) else held

    def packed(self) -> Block:
        """The same block held as bits, eight voxels a byte."""
        held = self.held
        return self if isinstance(held, PackedMask) else Block(self.box, PackedMask(held))

    def unpack(self) -> Block | None:
        """The block as booleans; None when it holds nothing."""
        if self.held.shape[0] == 0:
            return None
        return Block(self.box, self.held.unpack()) if isinstance(self.held, PackedMask) else self

    def full(self, shape: tuple[int, ...]) -> np.ndarray:
        """The whole mask; np.zeros leaves the pages outside the box untouched (no RSS)."""
        out = np.zeros(shape, dtype=bool)
        out[self.box] = self.array
        return out

    def rows(self, z0: int, z1: int) -> np.ndarray:
        """Slices ``z0:z1`` of the block (indices within its box): a view of booleans,
        a new array from bits."""
        held = self.held
        return held.slab(z0, z1) if isinstance(held, PackedMask) else held[z0:z1]

    def within(self, box: Box) -> np.ndarray:
        """The mask on ``box`` (any box of the volume): a new array, filled from the
        block's rows a slab at a time."""
        out = np.zeros(tuple(s.stop - s.start for s in box), dtype=bool)
        lo = [max(b.start, o.start) for b, o in zip(self.box, box, strict=True)]
        hi = [min(b.stop, o.stop) for b, o in zip(self.box, box, strict=True)]
        if not all(h > low for low, h in zip(lo, hi, strict=True)):
            return out
        origin = [s.start for s in self.box]
        ys, xs = (slice(lo[a] - origin[a], hi[a] - origin[a]) for a in (1, 2))
        into_y, into_x = (slice(lo[a] - box[a].start, hi[a] - box[a].start) for a in (1, 2))
        for z in range(lo[0], hi[0], SLAB):
            stop = min(z + SLAB, hi[0])
            out[z - box[0].start:stop - box[0].start, into_y, into_x] = (
                self.rows(z - origin[0], stop - origin[0])[:, ys, xs])
        return out

    def tightened(self, shape: tuple[int, int, int]) -> Block | None:
        """A copy of the block, as booleans, on its bounding box in a grid of ``shape``;
        None when empty. The box is found as a delivered crop's is."""
        origin = (self.box[0].start, self.box[1].start, self.box[2].start)
        crop = MaskCrop.of(self.array, shape, origin)
        return None if crop.array.size == 0 else Block(crop.box, crop.array)

    def crop(self, shape: tuple[int, int, int]) -> MaskCrop:
        """The mask as delivered, a crop of the grid of ``shape``; the block is tight
        (:meth:`tightened`)."""
        return MaskCrop(shape, self.box, self.array)


def packed_block(block: Block | None) -> Block:
    """``block`` held as bits (:meth:`Block.packed`); for None, a block of nothing."""
    return Block(EMPTY_BOX, PackedMask(np.zeros((0, 0, 0), dtype=bool))) if block is None \
        else block.packed()


# The same, under the name that callers wanting a block of bits read best.
PackedBlock = packed_block


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
