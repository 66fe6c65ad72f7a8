from __future__ import annotations

import numpy as np
import pytest

from oncoseg_node.contouring.engines.base import StructureResult
from oncoseg_node.contouring.mask_crop import MaskCrop


def blob(shape=(9, 20, 30), seed=3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, dtype=bool)
    mask[2:7, 4:15, 11:26] = rng.random((5, 11, 15)) > 0.4
    return mask


def test_crop_is_the_tight_bounding_box_and_restores_the_mask():
    mask = blob()
    crop = MaskCrop.of(mask)
    zs, ys, xs = np.nonzero(mask)
    assert crop.box == (slice(zs.min(), zs.max() + 1), slice(ys.min(), ys.max() + 1),
                        slice(xs.min(), xs.max() + 1))
    assert crop.shape == mask.shape and crop.count() == int(mask.sum())
    assert np.array_equal(crop.full(), mask)
    assert not np.shares_memory(crop.array, mask)  # the full array can be freed


def test_crop_of_a_block_is_placed_at_its_origin():
    mask = blob()
    block = mask[1:8, 3:17, 10:28]
    crop = MaskCrop.of(block, shape=mask.shape, origin=(1, 3, 10))
    assert np.array_equal(crop.full(), mask)
    assert crop.box == MaskCrop.of(mask).box


def test_sections_along_each_axis_match_the_full_mask():
    mask = blob()
    crop = MaskCrop.of(mask)
    for axis in range(3):
        for index in range(mask.shape[axis]):
            assert np.array_equal(crop.section(axis, index), np.take(mask, index, axis=axis))


def test_empty_mask_gives_an_empty_crop_of_the_right_grid():
    crop = MaskCrop.of(np.zeros((4, 5, 6), bool))
    assert crop.empty and crop.count() == 0
    assert np.array_equal(crop.full(), np.zeros((4, 5, 6), bool))
    assert not crop.section(0, 2).any() and crop.section(0, 2).shape == (5, 6)


@pytest.mark.parametrize("box, array, why", [
    ((slice(0, 3), slice(0, 2), slice(0, 2)), np.ones((2, 2, 2), bool), "does not fill"),
    ((slice(0, 2), slice(0, 2), slice(5, 7)), np.ones((2, 2, 2), bool), "does not lie"),
    ((slice(0, 2), slice(0, 2), slice(0, 2)), np.ones((2, 2, 2), np.uint8), "boolean"),
])
def test_an_inconsistent_crop_is_refused(box, array, why):
    with pytest.raises(ValueError, match=why):
        MaskCrop((4, 4, 6), box, array)


def test_result_built_from_a_full_mask_or_a_crop_is_the_same():
    mask = blob()
    from_full = StructureResult("Heart", mask, score=0.5)
    from_crop = StructureResult("Heart", MaskCrop.of(mask), score=0.5)
    for result in (from_full, from_crop):
        assert not result.absent and result.found_crop.count() == int(mask.sum())
        assert np.array_equal(result.mask, mask)
    flagged = from_crop.with_flags(("low score",))
    assert flagged.flags == ("low score",) and flagged.found_crop is from_crop.crop
    assert StructureResult("Heart", np.zeros((3, 3, 3), bool)).absent
    missing = StructureResult("Heart", None, note="not found")
    assert missing.absent and missing.mask is None
    with pytest.raises(ValueError, match="not found"):
        _ = missing.found_crop
