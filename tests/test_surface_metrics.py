"""Surface metrics against DeepMind's surface-distance package, and per-slice geometry.

On uniform grids our surface Dice, mean surface distance and HD95 must be
those of the reference implementation of Nikolov et al. 2021 (within 0.01 and
0.1 mm); on a series with an irregular slice gap, distances follow the
slices' real positions.
"""

from __future__ import annotations

import numpy as np
import pytest
import surface_distance  # the reference implementation (github.com/deepmind/surface-distance)
from pydicom.dataset import Dataset
from scipy import ndimage

from oncoseg_node.commissioning.evaluate import compare
from oncoseg_node.commissioning.surface import surfaces
from oncoseg_node.contouring.volume import Volume

SHAPE = (40, 72, 72)


def volume(z_positions: list[float] | np.ndarray, spacing: tuple[float, float]) -> Volume:
    n = len(z_positions)
    return Volume(hu=np.zeros((n, SHAPE[1], SHAPE[2]), np.float32),
                  positions=np.array([[-40.0, -30.0, z] for z in z_positions]),
                  row_direction=np.array([1.0, 0, 0]), col_direction=np.array([0, 1.0, 0]),
                  pixel_spacing=spacing, sop_instance_uids=tuple(map(str, range(n))),
                  sop_class_uid="1.2.840.10008.5.1.4.1.1.2", study_instance_uid="1",
                  series_instance_uid="2", frame_of_reference_uid="3", patient_position="HFS",
                  header=Dataset())


def ellipsoid(centre: tuple[float, float, float], radii: tuple[float, float, float],
              shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    z, y, x = np.indices(shape, dtype=float)
    return sum(((a - c) / r) ** 2 for a, c, r in zip((z, y, x), centre, radii,
                                                       strict=True)) <= 1.0


LUNG = ellipsoid((20, 36, 36), (13, 24, 15))
CANAL = ellipsoid((20, 36, 36), (18, 3.2, 3.2))
CASES = {  # name: (ours, reference)
    "lung shifted 2 columns": (np.roll(LUNG, 2, axis=2), LUNG),
    "lung shifted 1 slice, 3 rows": (np.roll(np.roll(LUNG, 1, axis=0), 3, axis=1), LUNG),
    "lung eroded 2 voxels": (ndimage.binary_erosion(LUNG, iterations=2), LUNG),
    "lung dilated 3 voxels": (ndimage.binary_dilation(LUNG, iterations=3), LUNG),
    "canal shifted 2 columns": (np.roll(CANAL, 2, axis=2), CANAL),
    "thin plate 2 voxels thick": (ellipsoid((20, 36, 37), (14, 1.2, 20)),
                                  ellipsoid((20, 36, 36), (14, 1.2, 20))),
}
SPACINGS = [(1.0, 1.0, 1.0), (3.0, 0.98, 0.98), (2.0, 1.2, 0.7)]  # (slice, row, column) mm


@pytest.mark.parametrize("spacing", SPACINGS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_surface_distance_package(case, spacing):
    ours, reference = CASES[case]
    v = volume([k * spacing[0] for k in range(SHAPE[0])], spacing[1:])
    peer = surface_distance.compute_surface_distances(reference, ours, spacing)
    area_ref, area_ours = peer["surfel_areas_gt"].sum(), peer["surfel_areas_pred"].sum()
    to_ours, to_ref = surface_distance.compute_average_surface_distance(peer)
    peer_msd = (to_ours * area_ref + to_ref * area_ours) / (area_ref + area_ours)
    for tolerance in (1.0, 2.0, 3.0):
        m = compare(v, ours, reference, tolerance_mm=tolerance)
        expected = surface_distance.compute_surface_dice_at_tolerance(peer, tolerance)
        assert m.surface_dice == pytest.approx(expected, abs=0.01), (case, tolerance)
    assert m.msd_mm == pytest.approx(peer_msd, abs=0.1)
    assert m.hd95_mm == pytest.approx(surface_distance.compute_robust_hausdorff(peer, 95),
                                      abs=0.1)
    assert 0.0 < m.surface_dice <= 1.0 and m.msd_mm > 0


def test_surfel_areas_match_the_package_and_do_not_depend_on_orientation():
    spacing = (2.5, 0.9, 1.3)
    v = volume([k * spacing[0] for k in range(SHAPE[0])], spacing[1:])
    peer = surface_distance.compute_surface_distances(LUNG, LUNG, spacing)
    ours, _ = surfaces(v, LUNG, LUNG)
    assert ours.areas.sum() == pytest.approx(peer["surfel_areas_gt"].sum(), rel=1e-9)
    # the same patient anatomy scanned feet first: rows and columns flipped in the image
    flipped = volume([k * spacing[0] for k in range(SHAPE[0])], spacing[1:])
    object.__setattr__(flipped, "row_direction", np.array([-1.0, 0, 0]))
    object.__setattr__(flipped, "col_direction", np.array([0, -1.0, 0]))
    mirrored, _ = surfaces(flipped, LUNG[::-1, ::-1, ::-1].copy(), LUNG[::-1, ::-1, ::-1].copy())
    assert mirrored.areas.sum() == pytest.approx(ours.areas.sum(), rel=1e-9)


def test_distances_follow_each_slices_position_across_an_irregular_gap():
    # 1 mm slices with one 5 mm gap between slice 9 (z = 9) and slice 10 (z = 14)
    z = [float(k) for k in range(10)] + [14.0 + k for k in range(SHAPE[0] - 10)]
    v = volume(z, (1.0, 1.0))
    reference = np.zeros((len(z), SHAPE[1], SHAPE[2]), bool)
    reference[2:10, 20:40, 20:40] = True   # top face between z = 9 and z = 14: at 11.5
    ours = reference.copy()
    ours[10] = ours[9]                     # one slice more: top face now at 14.5
    m = compare(v, ours, reference, tolerance_mm=2.0)
    # a uniform 1 mm grid would call this one voxel; in the patient it is 3 mm
    assert m.hd95_mm == pytest.approx(3.0)
    assert m.surface_dice < 1.0
    assert compare(v, ours, reference, tolerance_mm=3.0).surface_dice == pytest.approx(1.0)
    # 20 x 20 mm more on the slice at z = 14, which stands for 1 mm + half the 5 mm gap
    assert m.volume_difference_cc == pytest.approx(20 * 20 * 3.0 / 1000.0)


def test_identical_and_empty_masks():
    v = volume([k * 2.0 for k in range(SHAPE[0])], (1.0, 1.0))
    same = compare(v, LUNG, LUNG)
    assert (same.dice, same.surface_dice, same.msd_mm, same.hd95_mm) == (1.0, 1.0, 0.0, 0.0)
    missing = compare(v, np.zeros(SHAPE, bool), LUNG)
    assert missing.dice == 0.0 and missing.surface_dice == 0.0
    assert missing.hd95_mm == float("inf") and missing.msd_mm == float("inf")
