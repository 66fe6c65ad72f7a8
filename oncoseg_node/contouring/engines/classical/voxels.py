"""Masks and labels held as their voxels or their bits, not as box-sized arrays.

Voxel counts per label a few million at a time, label lookups a slab at a
time, reads of a few voxels of a strided view without copying it, and
boolean masks packed eight voxels to a byte while they wait for their next use.
"""

from __future__ import annotations

import numpy as np

from oncoseg_node.contouring.engines.classical.slabs import SLAB


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
    for z in range(0, labels.shape[0], SLAB):
        np.take(table, labels[z:z + SLAB], out=out[z:z + SLAB])
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


def mask_of(shape: tuple[int, ...], flat: np.ndarray) -> np.ndarray:
    """A boolean array of ``shape`` set at the flat indices ``flat``."""
    out = np.zeros(shape, dtype=bool)
    out.ravel()[flat] = True
    return out


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
