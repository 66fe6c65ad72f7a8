"""Slab-wise steps against one whole-volume scipy pass, at the series lengths where
slabs split: 1, 15, 16, 17, 31, 32, 33 and 65 slices, masks reaching every edge.

The engine's slabs are 16 slices (thresholds, morphology, hole filling) and 32
(the body's parts); a series one slice either side of those, or of one slice,
is where an off-by-one at a border would show.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from oncoseg_node.commissioning.phantom import make_phantom
from oncoseg_node.contouring.engines.classical.body import MIN_BODY_FRACTION, _keep_main_parts
from oncoseg_node.contouring.engines.classical.morphology import fill_holes
from oncoseg_node.contouring.engines.classical.postprocess import postprocess
from oncoseg_node.contouring.protocols import PostProcess

LENGTHS = [1, 15, 16, 17, 31, 32, 33, 65]


def pieces(n: int, seed: int) -> np.ndarray:
    """Many pieces with holes, touching the first and last slice, row 0 and the last column."""
    rng = np.random.default_rng(seed)
    mask = ndimage.binary_opening(rng.random((n, 28, 30)) < 0.6, np.ones((1, 2, 2)))
    mask |= rng.random(mask.shape) < 0.02  # specks of one voxel
    mask[:, 0, :] |= rng.random((n, 30)) < 0.5
    mask[:, :, -1] |= rng.random((n, 28)) < 0.5
    mask[:, 10:15, 10:15] = True
    mask[:, 12, 12] = False  # a hole on every slice
    return mask


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("seed", range(2))
def test_body_parts_and_holes_at_every_slab_split(n, seed):
    mask = pieces(n, seed)
    labels, count = ndimage.label(mask)
    sizes = np.bincount(labels.ravel())[1:]
    expected = np.isin(labels, np.flatnonzero(sizes >= MIN_BODY_FRACTION * sizes.max()) + 1)
    assert count > 1
    kept = mask.copy()
    assert _keep_main_parts(kept)
    assert np.array_equal(kept, expected)
    filled = np.stack([ndimage.binary_fill_holes(s) for s in mask])
    assert not np.array_equal(filled, mask)  # there were holes to fill
    assert np.array_equal(fill_holes(mask), filled)


def test_a_piece_joined_only_through_the_next_slabs_is_one_part():
    # Two columns in slab 0 that meet only in slab 2 (slices 64..): one part.
    mask = np.zeros((70, 12, 12), dtype=bool)
    mask[:68, 2:4, 2:4] = True
    mask[:68, 8:10, 8:10] = True
    mask[66:68, 2:10, 2:10] = True
    mask[0:2, 5:7, 5:7] = True  # a small separate piece, dropped
    labels, _ = ndimage.label(mask)
    kept = mask.copy()
    assert _keep_main_parts(kept)
    assert np.array_equal(kept, labels == labels[0, 2, 2])
    assert labels[0, 2, 2] == labels[0, 8, 8]


@pytest.mark.parametrize("n", [1, 16, 17, 33])
def test_postprocess_of_a_mask_on_the_volume_edges_equals_scipy(n):
    volume = make_phantom(slices=n, rows=28, columns=30).volume
    mask = pieces(n, 7)
    rules = PostProcess(fill_holes=True, keep_components=1)
    filled = np.stack([ndimage.binary_fill_holes(s) for s in mask])
    labels, count = ndimage.label(filled)
    cc = volume.voxel_volume_mm3 / 1000.0
    sizes = np.array([(cc * (labels == k).sum(axis=(1, 2))).sum() for k in range(1, count + 1)])
    expected = labels == int(np.argmax(sizes)) + 1
    assert np.array_equal(postprocess(volume, mask, rules), expected)
