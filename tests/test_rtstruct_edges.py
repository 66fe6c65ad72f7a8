"""Structure sets of masks on the volume's edges, rasterised back exactly, dciodvfy clean.

Small hand-made series rather than the phantom: masks on the first and last
slice, row 0 and the last column, one voxel, one slice, a ring, the whole
volume, a series of one slice, non-uniform slice spacing, and an ROI with
nothing left to draw. Each is written from a full mask and from its crop.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from oncoseg_node.contouring.mask_crop import MaskCrop
from oncoseg_node.contouring.volume import volume_from_datasets
from oncoseg_node.rtstruct.profiles import PROFILES
from oncoseg_node.rtstruct.reader import rasterize_crops, rasterize_rtstruct
from oncoseg_node.rtstruct.selfcheck import save_verified
from oncoseg_node.rtstruct.writer import GenerationInfo, RoiMask, build_rtstruct
from tests.ctfactory import series
from tests.peers import dciodvfy

pytestmark = pytest.mark.peers

INFO = GenerationInfo("classical", "thresholds v1", "thorax", "0123abcd")
SIZE = 16


def volume(offsets: list[float]):
    datasets = series(len(offsets), size=SIZE)
    for ds, z in zip(datasets, offsets, strict=True):
        ds.ImagePositionPatient = [-20.0, -20.0, float(z)]
    return volume_from_datasets(datasets)


def edge_masks(shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    z, y, x = shape
    masks = {name: np.zeros(shape, dtype=bool) for name in
             ("Edges", "Corner", "Origin", "OneSlice", "Ring")}
    masks["Edges"][0, 0, :] = True
    masks["Edges"][z - 1, :, x - 1] = True
    masks["Edges"][z // 2, 0:3, x - 3:] = True
    masks["Corner"][z - 1, y - 1, x - 1] = True
    masks["Origin"][0, 0, 0] = True
    masks["OneSlice"][z // 2, 2:9, 4:12] = True
    masks["OneSlice"][z // 2, 4:6, 6:9] = False  # with a hole
    masks["Ring"][0] = True
    masks["Ring"][0, 5:10, 5:10] = False
    masks["Whole"] = np.ones(shape, dtype=bool)
    return masks


def write(tmp_path: Path, vol, masks: dict[str, np.ndarray], profile: str, crop: bool,
          **options) -> Path:
    rois = [RoiMask(name, (255, 0, 0), "ORGAN", MaskCrop.of(mask) if crop else mask)
            for name, mask in masks.items()]
    ds = build_rtstruct(vol, rois, INFO, PROFILES[profile], **options)
    path = tmp_path / "RS.dcm"
    save_verified(ds, path, vol, PROFILES[profile])
    return path


@pytest.mark.parametrize("crop", [False, True], ids=["full", "crop"])
@pytest.mark.parametrize("profile", ["generic", "raystation", "eclipse"])
@pytest.mark.parametrize("offsets", [[0, 2.5, 5, 7.5, 10], [0, 1, 3, 7, 8, 20], [4.0]],
                         ids=["uniform", "non-uniform", "one-slice"])
def test_edge_masks_round_trip_exactly(tmp_path, crop, profile, offsets):
    vol = volume(offsets)
    masks = edge_masks(vol.shape)
    path = write(tmp_path, vol, masks, profile, crop)
    back = rasterize_rtstruct(pydicom.dcmread(path), vol)
    crops = rasterize_crops(pydicom.dcmread(path), vol)
    for name, mask in masks.items():
        assert np.array_equal(back[name], mask), name
        assert np.array_equal(crops[name].full(), mask), name
    errors, output = dciodvfy(path)
    assert errors == [], output


@pytest.mark.parametrize("crop", [False, True], ids=["full", "crop"])
def test_an_roi_with_nothing_to_draw_has_no_empty_contour_sequence(tmp_path, crop):
    vol = volume([0, 2.5, 5])
    speck = np.zeros(vol.shape, dtype=bool)
    speck[1, 3, 3] = True  # one pixel: under the smallest island the writer keeps
    kept = np.zeros(vol.shape, dtype=bool)
    kept[:, 4:10, 4:10] = True
    masks = {"Empty": np.zeros(vol.shape, dtype=bool), "Speck": speck, "Kept": kept}
    path = write(tmp_path, vol, masks, "generic", crop, min_island_mm2=10.0)
    ds = pydicom.dcmread(path)
    back = rasterize_rtstruct(ds, vol)
    assert np.array_equal(back["Kept"], kept)
    assert not back.get("Empty", np.zeros(1, bool)).any()
    assert not back.get("Speck", np.zeros(1, bool)).any()
    errors, output = dciodvfy(path)
    assert errors == [], output
