"""Masks and labels held as their voxels or their bits, not as box-sized arrays.

Per-label statistics from the labelled voxels' flat indices, reads of a few
voxels of a strided view without copying it, and boolean masks packed eight
voxels to a byte while they wait for their next use.
"""

from __future__ import annotations

import numpy as np


def voxel_counts(labels: np.ndarray, count: int) -> np.ndarray:
    """Voxels of each label 0..count, a few million at a time.

    ``np.bincount`` copies its input to int64 first: on a whole volume's
    labels that copy is four times a uint16 label array.
    """
    flat = labels.reshape(-1)
    counts = np.zeros(count + 1, dtype=np.int64)
    for start in range(0, flat.size, 1 << 22):
        counts += np.bincount(flat[start:start + (1 << 22)], minlength=count + 1)
    return counts


def labelled_as(labels: np.ndarray, chosen: np.ndarray, count: int) -> np.ndarray:
    """Where ``labels`` is one of the labels ``chosen``: ``np.isin``, a slab at a time.

    ``np.isin`` on integer labels offsets them into an int64 array first
    (four times a uint16 label array); a lookup table read a slab at a time
    holds only a slab's indices.
    """
    table = np.zeros(count + 1, dtype=bool)
    table[chosen] = True
    table[0] = False
    out = np.empty(labels.shape, dtype=bool)
    for z in range(0, labels.shape[0], 16):
        np.take(table, labels[z:z + 16], out=out[z:z + 16])
    return out


def gather(values: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """``values.ravel()[flat]`` without ravel's copy of a strided view (a box of a volume)."""
    if values.flags.c_contiguous:
        return values.ravel()[flat]
    plane = values.shape[1] * values.shape[2]
    out = np.empty(flat.shape, dtype=values.dtype)
    # A quarter million at a time: each index's slice, row and column are int64 arrays.
    for start in range(0, flat.size, 1 << 18):
        z, rest = np.divmod(flat[start:start + (1 << 18)], plane)
        y, x = np.divmod(rest, values.shape[2])
        out[start:start + (1 << 18)] = values[z, y, x]
    return out


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


class PackedMask:
    """``mask`` packed eight voxels to a byte (C order), read back whole, by slab or by voxel."""

    def __init__(self, mask: np.ndarray) -> None:
        self.shape = mask.shape
        self.bits = np.packbits(mask, axis=None)

    def unpack(self) -> np.ndarray:
        """The whole mask, as a new boolean array."""
        count = int(np.prod(self.shape))
        return np.unpackbits(self.bits, count=count).view(bool).reshape(self.shape)

    def slab(self, z0: int, z1: int) -> np.ndarray:
        """Slices ``z0:z1`` of the mask (along the first axis), as a new boolean array."""
        z1 = min(z1, self.shape[0])
        plane = int(np.prod(self.shape[1:]))
        start, stop = z0 * plane, z1 * plane
        first = start >> 3
        bits = np.unpackbits(self.bits[first:(stop + 7) >> 3])
        begin = start - first * 8
        return bits[begin:begin + stop - start].view(bool).reshape((z1 - z0, *self.shape[1:]))

    def at(self, flat: np.ndarray) -> np.ndarray:
        """The mask at the flat (C order) indices ``flat``."""
        byte = self.bits[flat >> 3]
        return ((byte >> (7 - (flat & 7)).astype(np.uint8)) & 1).astype(bool)
