"""Mask clean-up the physicists configure per structure, and the slice-wise
morphology it and the classical engine are built from.

Masks are ``(z, y, x)`` booleans. Morphology here is in-plane (each slice on
its own), because contours are drawn per slice and slice spacing is often
much coarser and non-uniform. Dilation and erosion use rectangles built by
shift-and-OR doubling, and hole filling labels the background once for the
whole stack: both cost a few passes over memory instead of one scipy call per
slice, which is what keeps a 150-slice 512x512 series within seconds.

``postprocess`` is applied to every engine's output, so a protocol behaves
the same whichever engine contours the structure.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
from scipy import ndimage

from oncoseg_node.contouring.engines.classical.blocks import Block, box_in
from oncoseg_node.contouring.engines.classical.voxels import LabelStats, voxel_counts
from oncoseg_node.contouring.protocols import PostProcess
from oncoseg_node.contouring.volume import Volume

T = TypeVar("T")

# 4-connectivity within a slice, none across slices.
IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


GAUSS_TRUNCATE = 4.0  # scipy's default: the kernel reaches 4 sigma

# Slices combined at a time by the in-plane morphology: each slab's shifts stay
# in cache, and numpy's copy of an overlapping operand is a slab, not a volume.
SLAB = 16


def _slabs(mask: np.ndarray, axis: int = -1) -> list[np.ndarray]:
    """Views of ``mask`` that an in-plane step along ``axis`` can take one at a time."""
    if mask.ndim != 3 or axis % 3 == 0:
        return [mask]
    return [mask[z:z + SLAB] for z in range(0, mask.shape[0], SLAB)]


# Slab steps run on this many threads: numpy's loops and scipy's labelling
# release the GIL, and slabs write disjoint parts of their output, so the result
# is the same whatever the order they finish in.
WORKERS = min(2, os.cpu_count() or 1)
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_worker = threading.local()


def _mark_worker() -> None:
    _worker.busy = True


def _forget_pool() -> None:
    # A forked child has none of the parent's threads: it starts its own pool.
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def each_slab(step: Callable[[int], T], starts: Sequence[int]) -> list[T]:
    """``step(start)`` for each start, results in order; on WORKERS threads at once.

    Called again from inside a step it runs in place (a step waiting for
    steps queued behind it would wait for ever).
    """
    global _pool
    if WORKERS < 2 or len(starts) < 2 or getattr(_worker, "busy", False):
        return [step(start) for start in starts]
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="slab",
                                       initializer=_mark_worker)
    return list(_pool.map(step, starts))


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


def shift_or(mask: np.ndarray, radius: int, axis: int, op: np.ufunc) -> np.ndarray:
    """Combine each voxel with its neighbours up to ``radius`` along ``axis``."""
    out = mask.copy()
    for part in _slabs(out, axis):
        shift_in_place(part, radius, axis, op)
    return out


def _rectangle(mask: np.ndarray, ry: int, rx: int, op: np.ufunc, in_place: bool = False
               ) -> np.ndarray:
    out = mask if in_place else mask.copy()

    def step(part: np.ndarray) -> None:
        shift_in_place(part, ry, -2, op)
        shift_in_place(part, rx, -1, op)

    parts = _slabs(out)
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


def radius_px(volume: Volume, mm: float) -> tuple[int, int]:
    """A distance in mm as whole pixels along rows (y) and columns (x)."""
    return (int(round(mm / volume.pixel_spacing[0])), int(round(mm / volume.pixel_spacing[1])))


class LabelBuffer:
    """One box of uint16 labels written by several labellings in turn.

    Mapped at its first use, not before: the masks built ahead of the first
    labelling are then gone, and the buffer is not beside them.
    """

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(shape)
        self._array: np.ndarray | None = None

    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.empty(self.shape, dtype=np.uint16)
        return self._array


def compact_label(mask: np.ndarray, structure: np.ndarray | None = None,
                  out: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """``ndimage.label`` into uint16 when the labels fit: half the memory of int32.

    The numbering is scipy's either way; a mask of more than 65535 pieces is
    labelled again into int32. ``out`` (uint16, the mask's shape) is written
    instead of a new array: a box-sized array is memory the process must map
    afresh each time, a buffer reused by several labellings is mapped once.
    """
    try:
        if out is not None:
            return out, int(ndimage.label(mask, structure=structure, output=out))
        return ndimage.label(mask, structure=structure, output=np.uint16)
    except RuntimeError:  # scipy's "insufficient bit-depth in requested output type"
        return ndimage.label(mask, structure=structure)


def _plane_box(part: np.ndarray) -> tuple[slice, slice] | None:
    """In-plane bounding box of a slab's set pixels, one pixel of background around."""
    plane = np.logical_or.reduce(part, axis=0)
    rows = np.flatnonzero(plane.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(plane.any(axis=0))
    return (slice(max(int(rows[0]) - 1, 0), min(int(rows[-1]) + 2, part.shape[1])),
            slice(max(int(cols[0]) - 1, 0), min(int(cols[-1]) + 2, part.shape[2])))


Enclosed = tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray]


def _enclosed_in_slab(mask: np.ndarray, z: int) -> Enclosed | None:
    """For the slab of slices from ``z``: (where, background labels, which are enclosed).

    ``where`` is the slab cut to its mask's in-plane box and one pixel more:
    everything outside it is background open to the image's border, and so
    is any background piece touching its edge (the edge is either the
    image's border or background next to it). Labelling that cut instead of
    whole slices skips what cannot be a hole. None when the slab is empty.
    """
    part = mask[z:z + SLAB]
    plane = _plane_box(part)
    if plane is None:
        return None
    where = (slice(z, z + part.shape[0]), *plane)
    labels, count = compact_label(~mask[where], IN_PLANE)
    inside = np.ones(count + 1, dtype=bool)
    for edge in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        inside[edge] = False
    inside[0] = False  # label 0 is the mask itself
    return where, labels, inside


def _slab_starts(mask: np.ndarray) -> range:
    return range(0, mask.shape[0], SLAB)


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
        found = _enclosed_in_slab(mask, z)
        if found is not None:
            where, labels, inside = found
            out[where] |= inside[labels]

    each_slab(step, _slab_starts(mask))
    return out


def enclosed(mask: np.ndarray) -> np.ndarray:
    """The holes ``fill_holes`` fills: ``fill_holes(mask) & ~mask`` in one pass."""
    out = np.zeros(mask.shape, dtype=bool)

    def step(z: int) -> None:
        found = _enclosed_in_slab(mask, z)
        if found is not None:
            where, labels, inside = found
            out[where] = inside[labels]

    each_slab(step, _slab_starts(mask))
    return out


def enclosed_regions(mask: np.ndarray) -> LabelStats:
    """The holes ``fill_holes`` fills, as voxels labelled ``ndimage.label(enclosed(mask),
    IN_PLANE)`` would label them, from the labelling that found them.

    Numbering is scipy's (raster order of each hole's first voxel): a hole
    is one background piece of its slab, numbered in that same order. No
    volume of labels is made: holes are a small part of it.
    """
    def step(z: int) -> tuple[np.ndarray, np.ndarray, int] | None:
        found = _enclosed_in_slab(mask, z)
        if found is None:
            return None
        where, labels, inside = found
        # numbered 1.. within the slab here, on from the slabs before below
        number = np.cumsum(inside) * inside
        at = np.nonzero(inside[labels])
        flat = np.ravel_multi_index(
            tuple(i + w.start for i, w in zip(at, where, strict=True)), mask.shape)
        return flat, number[labels[at]], int(inside.sum())

    flats, labs = [], []
    count = 0
    for found in each_slab(step, _slab_starts(mask)):
        if found is None or not found[2]:
            continue
        flats.append(found[0])
        labs.append(found[1] + count)
        count += found[2]
    if not flats:
        nothing = np.zeros(0, dtype=np.int64)
        return LabelStats.from_voxels(nothing, nothing, 0)
    return LabelStats.from_voxels(np.concatenate(flats), np.concatenate(labs), count)


def bbox(mask: np.ndarray, pad: int = 0) -> tuple[slice, ...] | None:
    """Bounding box of the set voxels, grown by ``pad`` in-plane; None when empty."""
    return box_in(mask, tuple(slice(0, n) for n in mask.shape), mask.shape, pad)


def component_sizes_cc(volume: Volume, labels: np.ndarray, count: int,
                       z0: int = 0) -> np.ndarray:
    """Volume in cc of labels 1..count; ``labels`` may be a crop starting at slice ``z0``."""
    voxel_cc = volume.voxel_volume_mm3 / 1000.0
    sizes = np.zeros(count + 1)
    for k in range(labels.shape[0]):
        sizes += np.bincount(labels[k].ravel(), minlength=count + 1) * voxel_cc[z0 + k]
    return sizes[1:]


def _has_rules(rules: PostProcess) -> bool:
    return bool(rules.fill_holes or rules.smoothing_mm > 0 or rules.min_island_cc > 0
                or rules.keep_components or rules.min_slice_island_mm2 > 0)


def postprocess(volume: Volume, mask: np.ndarray, rules: PostProcess) -> np.ndarray:
    """Fill holes, smooth, drop small 3D islands, keep the N largest, drop slice specks."""
    if not _has_rules(rules) or not mask.any():
        return mask
    block = postprocess_block(volume, Block(tuple(slice(0, n) for n in mask.shape), mask),
                              rules)
    return np.zeros(mask.shape, dtype=bool) if block is None else block.full(mask.shape)


def postprocess_block(volume: Volume, block: Block | None, rules: PostProcess) -> Block | None:
    """:func:`postprocess` on a mask held as a block; None when nothing is left.

    The work runs on the mask's bounding box, grown along each axis by the
    smoothing kernel's reach (scipy's gaussian truncates at 4 sigma): holes
    are per slice and bounded by the mask, islands are counted whole, and
    beyond that reach the smoothed mask is empty, so the result is the same
    as on the whole volume.
    """
    if block is None or not block.array.any():
        return None
    if not _has_rules(rules):
        return block
    sigma = None
    pads: tuple[int, ...] = (0, 0, 0)
    if rules.smoothing_mm > 0:
        spacing_z = (float(np.median(np.diff(volume.slice_offsets)))
                     if volume.shape[0] > 1 else 1.0)
        sigma = [rules.smoothing_mm / max(spacing_z, 1e-6),
                 rules.smoothing_mm / volume.pixel_spacing[0],
                 rules.smoothing_mm / volume.pixel_spacing[1]]
        pads = tuple(int(GAUSS_TRUNCATE * s + 0.5) for s in sigma)
    box = box_in(block.array, block.box, volume.shape, pad=pads)
    assert box is not None  # the mask has voxels
    out = block.within(box)
    if rules.fill_holes:
        out = fill_holes(out, out=out)
    if sigma is not None:
        out = ndimage.gaussian_filter(out.astype(np.float32), sigma,
                                      truncate=GAUSS_TRUNCATE) >= 0.5
    if rules.min_island_cc > 0 or rules.keep_components:
        labels, count = compact_label(out)
        if count:
            sizes = component_sizes_cc(volume, labels, count, box[0].start)
            keep = sizes >= rules.min_island_cc
            if rules.keep_components:
                largest = np.zeros(count, dtype=bool)
                largest[np.argsort(sizes)[::-1][:rules.keep_components]] = True
                keep &= largest
            out = np.concatenate([[False], keep])[labels]
    if rules.min_slice_island_mm2 > 0:
        out = drop_slice_islands(volume, out, rules.min_slice_island_mm2)
    return Block(box, out) if out.any() else None


def drop_slice_islands(volume: Volume, mask: np.ndarray, min_mm2: float) -> np.ndarray:
    """Remove the 4-connected pieces of each slice whose area is under ``min_mm2``."""
    labels, count = compact_label(mask, IN_PLANE)
    if not count:
        return mask
    area_mm2 = voxel_counts(labels, count) * volume.pixel_spacing[0] * volume.pixel_spacing[1]
    keep = area_mm2 >= min_mm2
    keep[0] = False
    return keep[labels]
