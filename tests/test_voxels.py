"""Masks held as bits and voxels read from strided views give back exactly what was there."""

from __future__ import annotations

import numpy as np
import pytest

from oncoseg_node.contouring.engines.classical.blocks import Block, PackedBlock
from oncoseg_node.contouring.engines.classical.voxels import PackedMask, gather, labelled_as


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


def test_a_packed_block_reads_the_same_rows_and_boxes_as_its_booleans():
    rng = np.random.default_rng(7)
    block = Block((slice(3, 40), slice(5, 30), slice(2, 21)), rng.random((37, 25, 19)) < 0.4)
    packed = PackedBlock(block)
    for z0, z1 in ((0, 1), (0, 16), (15, 33), (30, 60)):
        assert np.array_equal(packed.rows(z0, z1), block.rows(z0, z1))
    boxes = [(slice(0, 50), slice(0, 40), slice(0, 30)),   # around the whole block
             (slice(10, 12), slice(6, 29), slice(3, 4)),   # inside it
             (slice(35, 45), slice(0, 8), slice(18, 25)),  # across its corner
             (slice(41, 45), slice(0, 8), slice(0, 3))]    # beside it: nothing
    for box in boxes:
        expected = block.full((50, 40, 30))[box]
        assert np.array_equal(block.within(box), expected)
        assert np.array_equal(packed.within(box), expected)
    unpacked = packed.unpack()
    assert unpacked is not None and unpacked.box == block.box
    assert np.array_equal(unpacked.array, block.array)


def test_a_packed_block_of_nothing():
    packed = PackedBlock(None)
    assert packed.unpack() is None
    assert not packed.within((slice(0, 4), slice(0, 5), slice(0, 6))).any()


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_labelled_as_is_isin(dtype):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 300, (37, 20, 30)).astype(dtype)
    chosen = np.array([1, 5, 17, 299])
    assert np.array_equal(labelled_as(labels, chosen, 299), np.isin(labels, chosen))
    assert not labelled_as(labels, np.array([0]), 299).any()  # background is never chosen
