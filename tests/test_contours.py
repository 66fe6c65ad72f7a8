"""The contour tracer against its own inverse on many random masks: trace, fill back, compare.

Each mask is traced as the writer does (a whole volume at once: several
slices, speckle, corner-touching pixels, masks touching the image edge),
written in both hole styles the profiles use (keyhole cuts, or separate
inner contours), converted to DICOM pixel indices and filled back with the
even-odd rule every planning system uses (``test_staircase.refill``). The
filled mask must equal the traced one pixel for pixel, and the regions must
be the mask's 4-connected components with outer loops positive and holes
negative.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from oncoseg_node.contouring.mask_crop import MaskCrop
from oncoseg_node.rtstruct.contour_items import roi_loops
from oncoseg_node.rtstruct.contours import fill_polygons, signed_area, trace_volume
from tests.test_staircase import refill

SEED = 20261201


def random_volumes(count: int) -> list[np.ndarray]:
    """Seeded (z, y, x) masks from salt-and-pepper to smooth blobs with holes and islands."""
    rng = np.random.default_rng(SEED)
    volumes = []
    for i in range(count):
        slices, rows, cols = int(rng.integers(1, 5)), int(rng.integers(1, 40)), \
            int(rng.integers(1, 40))
        noise = rng.random((slices, rows, cols))
        if i % 3:  # smooth: large regions whose holes hold islands
            sigma = float(rng.uniform(0.5, 3.0))
            noise = ndimage.gaussian_filter(noise, sigma=(0, sigma, sigma))
            threshold = np.quantile(noise, rng.uniform(0.2, 0.8))
        else:  # speckle: single pixels, corner-touching pairs, one-pixel gaps
            threshold = rng.uniform(0.1, 0.9)
        mask = noise > threshold
        if i % 7 == 0:  # masks touching every edge of the image
            mask[:, 0, :] = mask[:, -1, :] = True
        volumes.append(mask)
    return volumes


VOLUMES = random_volumes(240)


@pytest.mark.parametrize("hole_style", ["keyhole", "separate"])
def test_trace_then_fill_gives_the_same_mask(hole_style):
    holes_seen = islands_seen = 0
    for index, mask in enumerate(VOLUMES):
        traced = trace_volume(mask)
        assert set(traced) == {z for z in range(mask.shape[0]) if mask[z].any()}, index
        for z, regions in traced.items():
            back = refill(regions, mask.shape[1:], hole_style)
            assert np.array_equal(back, mask[z]), f"volume {index} slice {z} ({hole_style})"
            holes_seen += sum(len(r.holes) for r in regions)
            islands_seen += len(regions)
    # the set exercises what it claims to: many holes, many separate regions
    assert holes_seen > 200 and islands_seen > 2000


def test_regions_are_4_connected_components_with_outer_and_hole_orientation():
    for index, mask in enumerate(VOLUMES[:80]):
        traced = trace_volume(mask)
        for z, regions in traced.items():
            _, count = ndimage.label(mask[z])  # 4-connectivity: the default structure
            assert len(regions) == count, f"volume {index} slice {z}"
            assert sum(r.pixels for r in regions) == int(mask[z].sum())
            for region in regions:
                assert signed_area(region.outer) > 0
                assert all(signed_area(hole) < 0 for hole in region.holes)
                area = signed_area(region.outer) + sum(signed_area(h) for h in region.holes)
                assert area == region.pixels


def test_min_pixels_drops_only_the_small_regions():
    mask = np.zeros((1, 12, 12), dtype=bool)
    mask[0, 1, 1] = True  # one pixel
    mask[0, 4:8, 4:8] = True  # sixteen
    (kept,) = trace_volume(mask, min_pixels=2)[0]
    assert kept.pixels == 16
    assert trace_volume(mask, min_pixels=17) == {}


@pytest.mark.parametrize("hole_style", ["keyhole", "separate"])
def test_a_crop_is_traced_to_the_same_loops_as_its_full_mask(hole_style):
    """Loops traced inside a crop's box are placed on the grid exactly as the full mask's."""
    for mask in VOLUMES[:80]:
        grid = np.zeros((mask.shape[0] + 3, mask.shape[1] + 7, mask.shape[2] + 5), bool)
        grid[2:2 + mask.shape[0], 5:5 + mask.shape[1], 1:1 + mask.shape[2]] = mask
        crop = MaskCrop.of(grid)
        whole = roi_loops(grid, hole_style, 1)
        cropped = roi_loops(crop, hole_style, 1)
        assert whole[0] == cropped[0]
        assert len(whole[1]) == len(cropped[1])
        assert all(np.array_equal(a, b) for a, b in zip(whole[1], cropped[1], strict=True))


def test_a_window_is_filled_exactly_as_that_part_of_the_whole_slice():
    """Polygons with fractional vertices, some beyond the image: window fill == full fill."""
    rng = np.random.default_rng(SEED)
    for _ in range(200):
        polygons = [rng.uniform(-6, 46, size=(int(rng.integers(3, 12)), 2)) for _ in range(3)]
        whole = fill_polygons(polygons, (40, 40))
        r0, c0 = int(rng.integers(0, 20)), int(rng.integers(0, 20))
        h, w = int(rng.integers(1, 41 - r0)), int(rng.integers(1, 41 - c0))
        window = fill_polygons(polygons, (h, w), origin=(r0, c0))
        assert np.array_equal(window, whole[r0:r0 + h, c0:c0 + w])


def test_slab_by_slab_edges_trace_the_same_loops_as_one_pass(monkeypatch):
    """The edge finder's slabs (here one slice each) change nothing in what is traced."""
    from oncoseg_node.rtstruct import contours

    stacked = [np.concatenate([m, m[::-1], m[:, ::-1]]) for m in VOLUMES[:60]]
    one_pass = [trace_volume(m, straight=True) for m in stacked]
    monkeypatch.setattr(contours, "SLAB_BYTES", 1)
    for mask, expected in zip(stacked, one_pass, strict=True):
        got = trace_volume(mask, straight=True)
        assert list(got) == list(expected)
        for z in got:
            assert len(got[z]) == len(expected[z])
            for a, b in zip(got[z], expected[z], strict=True):
                assert np.array_equal(a.outer, b.outer) and a.pixels == b.pixels
                assert all(np.array_equal(h, k) for h, k in zip(a.holes, b.holes, strict=True))


def test_a_few_slices_at_a_time_trace_the_same_loops_as_the_whole_mask(monkeypatch):
    """The tracer's slice chunks (here one slice, then two) change nothing in what is traced."""
    from oncoseg_node.rtstruct import contours

    stacked = [np.concatenate([m, m[::-1], m[:, ::-1]]) for m in VOLUMES[:60]]
    whole = [trace_volume(m, straight=True, origin=(3, 5, 7)) for m in stacked]
    for voxels in (1, 2 * 40 * 40):
        monkeypatch.setattr(contours, "TRACE_VOXELS", voxels)
        for mask, expected in zip(stacked, whole, strict=True):
            got = trace_volume(mask, straight=True, origin=(3, 5, 7))
            assert list(got) == list(expected)
            for z in got:
                assert len(got[z]) == len(expected[z])
                for a, b in zip(got[z], expected[z], strict=True):
                    assert np.array_equal(a.outer, b.outer) and a.pixels == b.pixels
                    assert all(np.array_equal(h, k)
                               for h, k in zip(a.holes, b.holes, strict=True))
