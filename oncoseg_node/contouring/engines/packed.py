"""A boolean array held as bits while it waits for its next use: an eighth of its bytes."""

from __future__ import annotations

import numpy as np


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
