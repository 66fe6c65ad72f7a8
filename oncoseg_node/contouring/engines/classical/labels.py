"""Labelling: compact labels, per-label statistics, and the holes a mask encloses.

Labels are uint16 when they fit, written into a buffer reused by several
labellings, and read back as the labelled voxels only (:class:`LabelStats`):
holes and components are a few percent of a box, their labels need not be
a box of int32.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from oncoseg_node.contouring.engines.classical.slabs import SLAB, each_slab, slab_starts
from oncoseg_node.contouring.engines.classical.voxels import gather, voxel_counts
from oncoseg_node.contouring.mask_crop import Box
from oncoseg_node.contouring.volume import Volume

# 4-connectivity within a slice, none across slices.
IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)

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


Enclosed = tuple[Box, np.ndarray, np.ndarray]


def enclosed_in_slab(mask: np.ndarray, z: int) -> Enclosed | None:
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


def enclosed(mask: np.ndarray) -> np.ndarray:
    """The holes ``fill_holes`` fills: ``fill_holes(mask) & ~mask`` in one pass."""
    out = np.zeros(mask.shape, dtype=bool)

    def step(z: int) -> None:
        found = enclosed_in_slab(mask, z)
        if found is not None:
            where, labels, inside = found
            out[where] = inside[labels]

    each_slab(step, slab_starts(mask))
    return out


def enclosed_regions(mask: np.ndarray) -> LabelStats:
    """The holes ``fill_holes`` fills, as voxels labelled ``ndimage.label(enclosed(mask),
    IN_PLANE)`` would label them, from the labelling that found them.

    Numbering is scipy's (raster order of each hole's first voxel): a hole
    is one background piece of its slab, numbered in that same order. No
    volume of labels is made: holes are a small part of it.
    """
    def step(z: int) -> tuple[np.ndarray, np.ndarray, int] | None:
        found = enclosed_in_slab(mask, z)
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
    for found in each_slab(step, slab_starts(mask)):
        if found is None or not found[2]:
            continue
        flats.append(found[0])
        labs.append(found[1] + count)
        count += found[2]
    if not flats:
        nothing = np.zeros(0, dtype=np.int64)
        return LabelStats.from_voxels(nothing, nothing, 0)
    return LabelStats.from_voxels(np.concatenate(flats), np.concatenate(labs), count)


class Components:
    """A mask's connected components: their labels and, per label 1..count, their sizes.

    Every step that sizes, keeps or drops components reads them here: sizes
    in voxels, cc (each slice's own voxel volume) or mm^2 (in-plane pieces),
    and the mask of the labels kept.
    """

    def __init__(self, labels: np.ndarray, count: int) -> None:
        self.labels = labels
        self.count = count

    def voxels(self) -> np.ndarray:
        """Voxels of each label 1..count."""
        return voxel_counts(self.labels, self.count)[1:]

    def cc(self, volume: Volume, z0: int = 0) -> np.ndarray:
        """Volume in cc of each label 1..count; the labels' slice 0 is the volume's ``z0``
        (slices may differ in thickness)."""
        voxel_cc = volume.voxel_volume_mm3 / 1000.0
        sizes = np.zeros(self.count + 1)
        for k in range(self.labels.shape[0]):
            sizes += np.bincount(self.labels[k].ravel(), minlength=self.count + 1) \
                * voxel_cc[z0 + k]
        return sizes[1:]

    def mm2(self, volume: Volume) -> np.ndarray:
        """Area in mm^2 of each label 1..count (of in-plane components: one slice each)."""
        return self.voxels() * volume.pixel_spacing[0] * volume.pixel_spacing[1]

    def touching(self, seed: np.ndarray) -> np.ndarray:
        """Per label 1..count, whether any of its voxels is set in ``seed``."""
        hit = np.zeros(self.count + 1, dtype=bool)
        hit[self.labels[seed]] = True
        return hit[1:]

    def mask(self, keep: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Where the label is one ``keep`` (per label 1..count) marks; into ``out`` if given.

        A lookup table read a slab at a time: indexing it with a box of labels
        would first make those labels a box of int64 indices.
        """
        table = np.concatenate([[False], np.asarray(keep, dtype=bool)])
        if out is None:
            out = np.empty(self.labels.shape, dtype=bool)
        for z in range(0, self.labels.shape[0], SLAB):
            np.take(table, self.labels[z:z + SLAB], out=out[z:z + SLAB])
        return out


def components(mask: np.ndarray, structure: np.ndarray | None = None,
               out: np.ndarray | None = None) -> Components:
    """The connected components of ``mask`` (``structure`` as ``ndimage.label``'s),
    labelled by :func:`compact_label` (into ``out`` when given)."""
    return Components(*compact_label(mask, structure, out))


def largest(sizes: np.ndarray, n: int) -> np.ndarray:
    """Per label, whether it is one of the ``n`` largest by ``sizes``."""
    out = np.zeros(len(sizes), dtype=bool)
    out[np.argsort(sizes)[::-1][:n]] = True
    return out


def component_sizes_cc(volume: Volume, labels: np.ndarray, count: int,
                       z0: int = 0) -> np.ndarray:
    """Volume in cc of labels 1..count; ``labels`` may be a crop starting at slice ``z0``."""
    return Components(labels, count).cc(volume, z0)


class LabelStats:
    """Per-label voxel count and mean of a few values, from the labelled voxels only.

    Labels are usually a few percent of the array: bincount over their flat
    indices costs a pass over those, where ``ndimage.mean`` passes over all.
    ``mask`` (``labels != 0``, when the caller holds it) spares a pass.
    """

    def __init__(self, labels: np.ndarray, count: int, mask: np.ndarray | None = None) -> None:
        self.count = count
        # nonzero of a boolean array is several times faster than of the labels
        self.flat = np.flatnonzero(labels != 0 if mask is None else mask)
        self.lab = labels.ravel()[self.flat]
        self.size = np.bincount(self.lab, minlength=count + 1)[1:]

    @classmethod
    def from_voxels(cls, flat: np.ndarray, lab: np.ndarray, count: int) -> LabelStats:
        """Statistics of labelled voxels given directly: flat indices (ascending) and labels."""
        stats = object.__new__(cls)
        stats.count = count
        stats.flat = flat
        stats.lab = lab
        stats.size = np.bincount(lab, minlength=count + 1)[1:]
        return stats

    def subset(self, keep: np.ndarray) -> LabelStats:
        """The same labels over fewer voxels: ``keep`` is a boolean per labelled voxel
        (in ``flat`` order), as ``where.ravel()[stats.flat]`` gives for a mask ``where``."""
        return LabelStats.from_voxels(self.flat[keep], self.lab[keep], self.count)

    def where(self, keep: np.ndarray, shape: tuple[int, ...],
              among: np.ndarray | None = None) -> np.ndarray:
        """The mask of the voxels whose label ``keep`` (indexed 0..count) marks; only
        those also in ``among`` when given (``keep[labels] & among`` without a pass
        over the labels)."""
        chosen = keep[self.lab]
        if among is not None:
            chosen &= among.ravel()[self.flat]
        out = np.zeros(shape, dtype=bool)
        out.ravel()[self.flat[chosen]] = True
        return out

    def _select(self, where: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if where is None:
            return self.lab, self.flat
        keep = where.ravel()[self.flat]
        return self.lab[keep], self.flat[keep]

    def mean(self, values: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
        """Mean of ``values`` per label (over voxels also in ``where``); NaN where none."""
        lab, flat = self._select(where)
        n = np.bincount(lab, minlength=self.count + 1)[1:]
        total = np.bincount(lab, weights=gather(values, flat), minlength=self.count + 1)[1:]
        with np.errstate(invalid="ignore", divide="ignore"):
            return total / n

    def mean_and_sd(self, values: np.ndarray, where: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation of ``values`` per label (over ``where``); NaN where none.

        Squares are taken of the labelled voxels alone, in at least float32 (an
        int16 square overflows), never of a whole array.
        """
        lab, flat = self._select(where)
        picked = gather(values, flat)
        picked = picked.astype(np.result_type(picked.dtype, np.float32), copy=False)
        n = np.bincount(lab, minlength=self.count + 1)[1:]
        total = np.bincount(lab, weights=picked, minlength=self.count + 1)[1:]
        squares = np.bincount(lab, weights=picked * picked, minlength=self.count + 1)[1:]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = total / n
            return mean, np.sqrt(np.maximum(squares / n - mean ** 2, 0.0))

    def any(self, mask: np.ndarray) -> np.ndarray:
        """Per label, whether any of its voxels is set in ``mask``."""
        return np.bincount(self.lab[mask.ravel()[self.flat]], minlength=self.count + 1)[1:] > 0

    def centres(self, shape: tuple[int, ...]) -> np.ndarray:
        """(count, ndim) mean index of each label."""
        idx = np.unravel_index(self.flat, shape)
        return np.stack([np.bincount(self.lab, weights=i, minlength=self.count + 1)[1:]
                         for i in idx], axis=1) / np.maximum(self.size, 1)[:, None]
