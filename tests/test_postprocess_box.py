"""Protocol clean-up on a mask's box gives what it gives on the whole volume.

``postprocess`` works on the mask's bounding box (grown by the smoothing
kernel's reach); the reference here is each rule written out with scipy on
the whole grid. Masks lie in the middle and against every edge of the
volume, where a box that is too tight or a wrong edge rule would show.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from oncoseg_node.commissioning.phantom import make_phantom
from oncoseg_node.contouring.engines.classical.engine import ClassicalEngine
from oncoseg_node.contouring.engines.classical.postprocess import postprocess
from oncoseg_node.contouring.protocols import PostProcess, Structure

SHAPE = (18, 48, 40)


@pytest.fixture(scope="module")
def volume():
    return make_phantom(slices=SHAPE[0], rows=SHAPE[1], columns=SHAPE[2],
                        pixel_spacing=(2.0, 2.5), slice_thickness=3.0).volume


def reference(volume, mask: np.ndarray, rules: PostProcess) -> np.ndarray:
    out = mask.copy()
    if rules.fill_holes:
        out = np.stack([ndimage.binary_fill_holes(s) for s in out])
    if rules.smoothing_mm > 0:
        dz = float(np.median(np.diff(volume.slice_offsets)))
        sigma = [rules.smoothing_mm / dz, rules.smoothing_mm / volume.pixel_spacing[0],
                 rules.smoothing_mm / volume.pixel_spacing[1]]
        out = ndimage.gaussian_filter(out.astype(np.float32), sigma) >= 0.5
    if rules.min_island_cc > 0 or rules.keep_components:
        labels, count = ndimage.label(out)
        cc = volume.voxel_volume_mm3 / 1000.0
        sizes = np.array([(cc * (labels == k).sum(axis=(1, 2))).sum()
                          for k in range(1, count + 1)])
        keep = sizes >= rules.min_island_cc
        if rules.keep_components:
            keep &= np.isin(np.arange(count), np.argsort(sizes)[::-1][:rules.keep_components])
        out = np.isin(labels, np.flatnonzero(keep) + 1)
    if rules.min_slice_island_mm2 > 0:
        px = volume.pixel_spacing[0] * volume.pixel_spacing[1]
        for z in range(out.shape[0]):
            labels, count = ndimage.label(out[z])
            areas = np.bincount(labels.ravel())[1:] * px
            out[z] = np.isin(labels, np.flatnonzero(areas >= rules.min_slice_island_mm2) + 1)
    return out


def blobs(where: str, seed: int) -> np.ndarray:
    """Rings with holes, specks and islands in one corner, an edge or the middle."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(SHAPE, dtype=bool)
    z = {"low": slice(0, 8), "high": slice(10, 18), "middle": slice(5, 13)}
    y = {"low": slice(0, 20), "high": slice(28, 48), "middle": slice(14, 34)}
    x = {"low": slice(0, 18), "high": slice(22, 40), "middle": slice(11, 29)}
    zs, ys, xs = (d[p] for d, p in zip((z, y, x), where.split("-"), strict=True))
    block = ndimage.binary_opening(rng.random((zs.stop - zs.start, ys.stop - ys.start,
                                               xs.stop - xs.start)) < 0.75)
    block[:, 6:9, 6:9] = False  # a hole in every slice
    block[:, :4, :4] = False
    block[0, 1, 1] = True  # an island of one voxel (0.015 cc)
    block[3:6, 1:3, 1:3] = True  # and one of 12 (0.18 cc)
    mask[zs, ys, xs] = block
    return mask


RULES = [
    PostProcess(fill_holes=True),
    PostProcess(smoothing_mm=2.0),
    PostProcess(smoothing_mm=4.0, fill_holes=True),
    PostProcess(min_island_cc=0.05),
    PostProcess(keep_components=2),
    PostProcess(min_slice_island_mm2=30.0),
    PostProcess(fill_holes=True, smoothing_mm=3.0, min_island_cc=0.02, keep_components=3,
                min_slice_island_mm2=20.0),
]
PLACES = ["middle-middle-middle", "low-low-low", "high-high-high", "low-high-middle",
          "middle-low-high"]


@pytest.mark.parametrize("rules", RULES, ids=repr)
@pytest.mark.parametrize("where", PLACES)
def test_postprocess_on_the_box_equals_the_whole_volume(volume, rules, where):
    mask = blobs(where, seed=PLACES.index(where))
    expected = reference(volume, mask, rules)
    assert expected.any() and not np.array_equal(expected, mask)  # the rule did something
    assert np.array_equal(postprocess(volume, mask, rules), expected)


def test_results_keep_the_protocols_order_whatever_order_steps_run():
    p = make_phantom(slices=12, rows=128, columns=128, pixel_spacing=(3.9, 3.9))
    names = ["Bones", "Trachea", "Lung_L", "Heart", "External", "SpinalCanal", "Lungs"]
    results = ClassicalEngine().segment(p.volume, [Structure(n, (0, 0, 0)) for n in names])
    assert [r.name for r in results] == names
    assert results[3].absent and results[3].note == "not supported by the classical engine"
    for result in results:
        if result.name == "Heart":
            continue
        (alone,) = ClassicalEngine().segment(p.volume, [Structure(result.name, (0, 0, 0))])
        assert result.absent == alone.absent
        if not alone.absent:
            assert np.array_equal(result.mask, alone.mask), result.name


@pytest.mark.parametrize("seed", range(4))
def test_body_parts_sized_slab_by_slab_are_those_of_one_3d_label(seed):
    from oncoseg_node.contouring.engines.classical.body import (
        LABEL_SLAB,
        MIN_BODY_FRACTION,
        _keep_main_parts,
    )

    rng = np.random.default_rng(seed)
    core = rng.random((3 * LABEL_SLAB + 5, 40, 40)) < 0.3  # many pieces, across slab borders
    core[:, 5:35, 18:22] = True   # one tall part through every slab
    core[:, 2, 2:38] = False      # pieces joined only in a later slab (a U along z)
    labels, count = ndimage.label(core)
    sizes = np.bincount(labels.ravel())[1:]
    expected = np.isin(labels, np.flatnonzero(sizes >= MIN_BODY_FRACTION * sizes.max()) + 1)
    assert 0 < expected.sum() < core.sum()  # some pieces are dropped
    assert _keep_main_parts(core)
    assert np.array_equal(core, expected)
    assert not _keep_main_parts(np.zeros((5, 8, 8), dtype=bool))
