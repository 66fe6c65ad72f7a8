from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from pydicom.dataset import Dataset

from oncoseg_node.contouring.engines.base import StructureResult
from oncoseg_node.contouring.mask_crop import MaskCrop
from oncoseg_node.contouring.protocols import Structure
from oncoseg_node.contouring.sanity import crop_volume_cc, flag_results, patient_centroid
from oncoseg_node.contouring.volume import Volume

ORIENTATIONS = {  # ImageOrientationPatient row and column directions
    "HFS": ((1, 0, 0), (0, 1, 0)),
    "HFP": ((-1, 0, 0), (0, -1, 0)),
    "FFS": ((-1, 0, 0), (0, 1, 0)),
    "FFP": ((1, 0, 0), (0, -1, 0)),
}


def volume_for(position: str, n: int = 40) -> Volume:
    row, col = (np.array(v, dtype=float) for v in ORIENTATIONS[position])
    normal = np.cross(row, col)
    origin = -(n - 1) / 2 * 2.0 * (row + col)  # centre the grid on patient x = y = 0
    positions = np.array([origin + k * 2.0 * normal for k in range(4)])
    hu = np.full((4, n, n), -1000.0, dtype=np.float32)
    hu[:, 5:35, 5:35] = 40.0  # body centred on the midline
    return Volume(hu=hu, positions=positions, row_direction=row, col_direction=col,
                  pixel_spacing=(2.0, 2.0), sop_instance_uids=("1", "2", "3", "4"),
                  sop_class_uid="1.2.840.10008.5.1.4.1.1.2", study_instance_uid="1",
                  series_instance_uid="2", frame_of_reference_uid="3",
                  patient_position=position, header=Dataset())


def patient_left_mask(volume: Volume) -> np.ndarray:
    """A block whose voxels all have patient x > 20 mm (the patient's left)."""
    mask = np.zeros(volume.shape, dtype=bool)
    x = volume.patient_x_of_columns()
    mask[:, 10:30, x > 20] = True
    return mask


@pytest.mark.parametrize("position", ["HFS", "HFP", "FFS", "FFP"])
def test_laterality_is_judged_in_patient_coordinates(position):
    volume = volume_for(position)
    mask = patient_left_mask(volume)
    left = Structure("Parotid_L", (0, 0, 255), laterality="left")
    right = Structure("Parotid_R", (0, 0, 255), laterality="right")
    results = flag_results(volume, [left, right], [StructureResult("Parotid_L", mask),
                                                   StructureResult("Parotid_R", mask)])
    assert results[0].flags == ()
    assert len(results[1].flags) == 1 and "patient's left" in results[1].flags[0]


def test_volume_outside_expected_range_is_flagged():
    volume = volume_for("HFS")
    mask = np.zeros(volume.shape, dtype=bool)
    mask[:, 10:20, 10:20] = True  # 4 slices x 100 voxels x 8 mm^3 = 3.2 cc
    structure = Structure("Heart", (255, 0, 0), volume_cc=(300, 1200))
    (result,) = flag_results(volume, [structure], [StructureResult("Heart", mask)])
    assert result.flags == ("volume 3.2 cc outside expected 300-1200 cc",)
    ok = Structure("Heart", (255, 0, 0), volume_cc=(1, 10))
    assert flag_results(volume, [ok], [StructureResult("Heart", mask)])[0].flags == ()


def test_centroid_from_a_crop_matches_every_voxel_mapped():
    volume = volume_for("FFP")
    mask = np.zeros(volume.shape, dtype=bool)
    mask[1:3, 12:19, 22:31] = True
    mask[2, 25, 8] = True
    z, r, c = np.nonzero(mask)
    every_voxel = volume.index_to_patient(z, r, c).mean(axis=0)
    assert np.allclose(patient_centroid(volume, MaskCrop.of(mask)), every_voxel)


def test_volume_from_a_crop_uses_each_slices_own_thickness():
    volume = volume_for("HFS")
    uneven = volume.positions.copy()
    uneven[2:] += np.array([0.0, 0.0, 3.0])  # slices 2 and 3 sit 3 mm further on
    volume = replace(volume, positions=uneven)
    mask = np.zeros(volume.shape, dtype=bool)
    mask[1:4, 10:20, 10:15] = True
    assert not np.allclose(volume.voxel_volume_mm3, volume.voxel_volume_mm3[0])
    assert crop_volume_cc(volume, MaskCrop.of(mask)) == pytest.approx(volume.mask_volume_cc(mask))
