"""Straightened pixel-edge contours enclose exactly the same pixel centres, with fewer points."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from oncoseg_node.rtstruct.contours import (
    corners_to_index,
    fill_polygons,
    keyhole,
    signed_area,
    trace_volume,
)


def refill(regions, shape, hole_style: str) -> np.ndarray:
    loops = []
    for region in regions:
        loops += ([keyhole(region.outer, region.holes)] if hole_style == "keyhole"
                  else [region.outer, *region.holes])
    return fill_polygons([np.stack(corners_to_index(loop), axis=1) for loop in loops], shape)


def random_masks(seed: int, count: int, size: int = 48) -> np.ndarray:
    """Blobs with holes, islands, diagonal touches and thin lines; some smoothed, some raw."""
    rng = np.random.default_rng(seed)
    noise = rng.random((count, size, size))
    masks = np.empty_like(noise, dtype=bool)
    for k in range(count):
        field = ndimage.gaussian_filter(noise[k], sigma=rng.uniform(0.0, 4.0))
        masks[k] = field > np.quantile(field, rng.uniform(0.3, 0.8))
    return masks


@pytest.mark.parametrize("hole_style", ["keyhole", "separate"])
@pytest.mark.parametrize("seed", range(4))
def test_straightened_contours_fill_back_to_the_same_mask(seed, hole_style):
    masks = random_masks(seed, 40)
    exact = trace_volume(masks)
    straight = trace_volume(masks, straight=True)
    assert exact.keys() == straight.keys()
    for z in range(len(masks)):
        regions = straight.get(z, [])
        assert np.array_equal(refill(regions, masks.shape[1:], hole_style), masks[z]), z


def test_a_disc_needs_far_fewer_points_and_keeps_its_area():
    yy, xx = np.mgrid[:200, :200]
    disc = ((yy - 99.5) ** 2 + (xx - 99.5) ** 2 < 80 ** 2)[None]
    (exact,) = trace_volume(disc)[0]
    (straight,) = trace_volume(disc, straight=True)[0]
    assert len(straight.outer) <= 0.6 * len(exact.outer)
    assert abs(signed_area(straight.outer) - disc.sum()) / disc.sum() < 0.002
    assert np.array_equal(refill([straight], disc.shape[1:], "keyhole"), disc[0])


def test_a_regular_staircase_is_one_straight_segment():
    # a right triangle below the diagonal: its hypotenuse is a 1:1 staircase
    triangle = np.tril(np.ones((30, 30), dtype=bool))[None]
    (exact,) = trace_volume(triangle)[0]
    (straight,) = trace_volume(triangle, straight=True)[0]
    assert len(exact.outer) == 62  # two corners a step, and the two legs
    assert len(straight.outer) <= 6
