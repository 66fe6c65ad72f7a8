"""Masks held as bits and voxels read from strided views give back exactly what was there."""

from __future__ import annotations

import numpy as np
import pytest

from oncoseg_node.contouring.engines.voxels import PackedMask, gather


@pytest.mark.parametrize("shape", [(37, 13, 11), (5, 3, 3), (16, 8, 8), (1, 1, 1)])
def test_a_packed_mask_reads_back_whole_by_slab_and_by_voxel(shape):
    rng = np.random.default_rng(sum(shape))
    mask = rng.random(shape) < 0.3
    packed = PackedMask(mask)
    assert packed.bits.nbytes == -(-mask.size // 8)
    assert np.array_equal(packed.unpack(), mask)
    for z0 in range(shape[0]):
        for z1 in (z0 + 1, z0 + 4, shape[0] + 2):  # a slab may run past the last slice
            assert np.array_equal(packed.slab(z0, z1), mask[z0:z1])
    flat = rng.integers(0, mask.size, 500)
    assert np.array_equal(packed.at(flat), mask.ravel()[flat])


def test_gather_from_a_box_of_a_volume_reads_the_box_own_voxels():
    volume = np.arange(6 * 40 * 50, dtype=np.int16).reshape(6, 40, 50)
    box = volume[1:5, 3:31, 7:42]  # a strided view, as the bone box is of the HU
    assert not box.flags.c_contiguous
    flat = np.random.default_rng(1).integers(0, box.size, (1 << 18) + 5)  # over one chunk
    assert np.array_equal(gather(box, flat), np.ascontiguousarray(box).ravel()[flat])
    assert np.array_equal(gather(volume, flat), volume.ravel()[flat])
