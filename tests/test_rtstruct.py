"""The RT Structure Set writer against its own reader, rt-utils, dicom3tools and Orthanc."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage
from pynetdicom import AE

from oncoseg_node.commissioning.phantom import write_phantom
from oncoseg_node.errors import RTStructError
from oncoseg_node.rtstruct.profiles import PROFILES
from oncoseg_node.rtstruct.reader import rasterize_rtstruct
from oncoseg_node.rtstruct.selfcheck import check_rtstruct, save_verified
from oncoseg_node.rtstruct.writer import GenerationInfo, RoiMask, build_rtstruct
from tests.orthanc_peer import orthanc
from tests.peers import dciodvfy

INFO = GenerationInfo("classical", "thresholds v1", "thorax", "0123abcd")
GEOMETRIES = {
    "HFS": {},
    "HFP": {"patient_position": "HFP"},
    "FFS": {"patient_position": "FFS"},
    "FFP": {"patient_position": "FFP"},
    "anisotropic": {"pixel_spacing": (1.2, 2.1)},
    "non-uniform": {"slice_offsets": [0, 2, 4, 6, 11, 16, 21, 24, 27, 30, 40, 50, 52, 54]},
}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def rois_from_truth(truth: dict[str, np.ndarray]) -> list[RoiMask]:
    return [RoiMask(name, (255, 128, 0), "EXTERNAL" if name == "External" else "ORGAN", mask)
            for name, mask in sorted(truth.items())]


def written(tmp_path: Path, geometry: str, profile: str = "generic"):
    kwargs = {"slices": 14, "rows": 160, "columns": 160, "pixel_spacing": (2.5, 2.5),
              **GEOMETRIES[geometry]}
    phantom = write_phantom(tmp_path / "ct", **kwargs)
    ds = build_rtstruct(phantom.volume, rois_from_truth(phantom.truth), INFO, PROFILES[profile])
    path = tmp_path / "ct" / "RS.dcm"
    save_verified(ds, path, phantom.volume, PROFILES[profile])
    return phantom, path


@pytest.mark.peers
@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_round_trip_and_dicom3tools_for_every_geometry(tmp_path, geometry):
    phantom, path = written(tmp_path, geometry)
    back = rasterize_rtstruct(pydicom.dcmread(path), phantom.volume)
    for name, truth in phantom.truth.items():
        assert dice(back[name], truth) >= 0.99, name
    errors, output = dciodvfy(path)
    assert errors == [], output
    proc = subprocess.run(["dcentvfy", *map(str, sorted((tmp_path / "ct").iterdir()))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Error" not in proc.stdout + proc.stderr, proc.stderr


@pytest.mark.parametrize("profile", ["raystation", "eclipse"])
def test_hole_styles_both_round_trip(tmp_path, profile):
    from oncoseg_node.rtstruct.contours import trace_regions

    phantom, path = written(tmp_path, "HFS", profile)
    ds = pydicom.dcmread(path)
    back = rasterize_rtstruct(ds, phantom.volume)
    assert dice(back["Bones"], phantom.truth["Bones"]) >= 0.99  # the canal is a hole
    number = next(i.ROINumber for i in ds.StructureSetROISequence if i.ROIName == "Bones")
    written_contours = next(len(r.ContourSequence) for r in ds.ROIContourSequence
                            if r.ReferencedROINumber == number)
    regions = [r for z in range(phantom.volume.shape[0])
               for r in trace_regions(phantom.truth["Bones"][z])]
    holes = sum(len(r.holes) for r in regions)
    assert holes > 0
    expected = len(regions) + (holes if PROFILES[profile].hole_style == "separate" else 0)
    assert written_contours == expected


def test_rt_utils_reads_the_same_masks_on_square_uniform_geometry(tmp_path):
    from rt_utils import RTStructBuilder

    phantom, path = written(tmp_path, "HFS")
    (tmp_path / "ct" / "RS.dcm").rename(tmp_path / "RS.dcm")
    rt = RTStructBuilder.create_from(dicom_series_path=str(tmp_path / "ct"),
                                     rt_struct_path=str(tmp_path / "RS.dcm"))
    order = {uid: k for k, uid in enumerate(phantom.volume.sop_instance_uids)}
    series = [ds.SOPInstanceUID for ds in rt.series_data]
    for name in ("External", "Lung_L", "Lung_R"):
        mask = rt.get_roi_mask_by_name(name)  # (rows, cols, slices) in rt-utils' order
        ours = np.zeros(phantom.volume.shape, dtype=bool)
        for k, uid in enumerate(series):
            ours[order[uid]] = mask[:, :, k]
        # rt-utils rounds contour vertices to pixel centres, so on pixel-edge
        # contours it gains or loses part of the boundary ring; the placement
        # (centroid) must still agree to a fraction of a pixel.
        assert dice(ours, phantom.truth[name]) >= 0.95, name
        a = np.argwhere(ours).mean(axis=0)
        b = np.argwhere(phantom.truth[name]).mean(axis=0)
        assert np.all(np.abs(a - b) < 0.75), (name, a, b)


def test_sphere_area_error_under_one_percent(tmp_path):
    phantom = write_phantom(tmp_path / "ct", slices=40, rows=128, columns=128,
                            pixel_spacing=(0.5, 0.5), slice_thickness=0.5)
    volume = phantom.volume
    zc = volume.slice_offsets.mean()
    mask = np.zeros(volume.shape, dtype=bool)
    ys, xs = np.mgrid[0:128, 0:128]
    for z in range(volume.shape[0]):
        pts = volume.index_to_patient(z, ys.ravel(), xs.ravel())
        r2 = pts[:, 0] ** 2 + pts[:, 1] ** 2 + (volume.slice_offsets[z] - zc) ** 2
        mask[z] = (r2 <= 10.0 ** 2).reshape(128, 128)
    ds = build_rtstruct(volume, [RoiMask("Sphere", (255, 0, 0), "ORGAN", mask)], INFO,
                        PROFILES["generic"])
    for contour in ds.ROIContourSequence[0].ContourSequence:
        pts = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
        x, y = pts[:, 0], pts[:, 1]
        area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))
        z = volume.sop_instance_uids.index(contour.ContourImageSequence[0]
                                           .ReferencedSOPInstanceUID)
        pixel_area = mask[z].sum() * 0.25
        assert abs(area - pixel_area) / pixel_area < 0.01


def test_draft_marking_references_and_ds_lengths(tmp_path):
    phantom, path = written(tmp_path, "HFS")
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.ApprovalStatus == "UNAPPROVED"
    assert "DRAFT" in ds.StructureSetLabel and "REVIEW" in ds.SeriesDescription
    assert ds.Manufacturer == "oncoseg-node"
    assert ds.PatientID == phantom.volume.header.PatientID
    for item in ds.StructureSetROISequence:
        assert item.ROIGenerationAlgorithm == "AUTOMATIC"
        assert "0123abcd" in item.ROIGenerationDescription
    types = {o.ReferencedROINumber: o.RTROIInterpretedType for o in ds.RTROIObservationsSequence}
    assert "EXTERNAL" in types.values() and "ORGAN" in types.values()
    for roi in ds.ROIContourSequence:
        for contour in roi.ContourSequence:
            raw = contour.get_item(0x30060050).value.split(b"\\")
            assert max(len(v.strip()) for v in raw) <= 16
            assert len(raw) == 3 * contour.NumberOfContourPoints >= 9
    assert check_rtstruct(ds, phantom.volume, PROFILES["generic"]) == []


def test_check_refuses_a_structure_set_of_another_series(tmp_path):
    phantom, path = written(tmp_path, "HFS")
    other = write_phantom(tmp_path / "other", slices=4, rows=64, columns=64,
                          pixel_spacing=(6.0, 6.0))
    problems = check_rtstruct(pydicom.dcmread(path), other.volume, PROFILES["generic"])
    assert any("FrameOfReferenceUID" in p for p in problems)
    assert any("ContourImageSequence" in p for p in problems)


def test_names_longer_than_the_profile_allows_are_refused(tmp_path):
    phantom = write_phantom(tmp_path / "ct", slices=4, rows=64, columns=64,
                            pixel_spacing=(6.0, 6.0))
    roi = RoiMask("A_Name_Longer_Than_16", (1, 2, 3), "ORGAN", phantom.truth["External"])
    with pytest.raises(RTStructError, match="eclipse"):
        build_rtstruct(phantom.volume, [roi], INFO, PROFILES["eclipse"])


def test_small_islands_are_dropped(tmp_path):
    phantom = write_phantom(tmp_path / "ct", slices=4, rows=64, columns=64,
                            pixel_spacing=(2.0, 2.0))
    mask = np.zeros(phantom.volume.shape, dtype=bool)
    mask[1, 10:20, 10:20] = True  # 400 mm^2
    mask[1, 40, 40] = True        # 4 mm^2 speck
    ds = build_rtstruct(phantom.volume, [RoiMask("Organ", (1, 2, 3), "ORGAN", mask)], INFO,
                        PROFILES["generic"], min_island_mm2=10.0)
    assert len(ds.ROIContourSequence[0].ContourSequence) == 1


@pytest.mark.peers
def test_orthanc_accepts_the_structure_set_and_lists_its_rois(tmp_path):
    phantom, path = written(tmp_path, "HFS")
    with orthanc(tmp_path / "orthanc") as peer:
        ae = AE(ae_title="ONCOSEG")
        ae.add_requested_context(RTStructureSetStorage, [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", peer.dicom_port, ae_title=peer.aet)
        assert assoc.is_established
        try:
            assert int(assoc.send_c_store(pydicom.dcmread(path)).Status) == 0
        finally:
            assoc.release()
        (instance,) = peer.get("/instances")
        tags = peer.get(f"/instances/{instance}/tags?simplify")
    names = sorted(item["ROIName"] for item in tags["StructureSetROISequence"])
    assert names == sorted(phantom.truth)
    assert tags["ApprovalStatus"] == "UNAPPROVED"


def test_check_reads_the_written_contour_items_and_finds_a_wrong_point_count(tmp_path):
    phantom, path = written(tmp_path, "HFS")
    data = bytearray(path.read_bytes())
    # The first NumberOfContourPoints (3006,0046) IS: claim one point more.
    at = data.index(b"\x06\x30\x46\x00IS")
    length = int.from_bytes(data[at + 6:at + 8], "little")
    value = data[at + 8:at + 8 + length]
    wrong = str(int(value) + 1).encode().ljust(length)
    assert len(wrong) == length
    data[at + 8:at + 8 + length] = wrong
    path.write_bytes(bytes(data))
    problems = check_rtstruct(pydicom.dcmread(path), phantom.volume, PROFILES["generic"])
    assert any("wrong point count" in p for p in problems), problems


def test_a_contour_too_long_for_one_contour_data_value_is_refused_by_name(tmp_path):
    phantom = write_phantom(tmp_path / "ct", slices=2, rows=512, columns=512,
                            pixel_spacing=(1.0, 1.0))
    mask = np.zeros(phantom.volume.shape, dtype=bool)
    mask[0, 2:510, 2:510] = True
    # One-pixel teeth on every side: thousands of corners on one outline,
    # more values than a DS element's 16-bit length can carry.
    mask[0, 1, 2:510:2] = mask[0, 510, 2:510:2] = True
    mask[0, 2:510:2, 1] = mask[0, 2:510:2, 510] = True
    with pytest.raises(RTStructError, match="Comb.*slice 1"):
        build_rtstruct(phantom.volume, [RoiMask("Comb", (1, 2, 3), "ORGAN", mask)], INFO,
                       PROFILES["generic"])


def test_read_back_as_crops_holds_each_structure_in_its_own_box(tmp_path):
    from oncoseg_node.contouring.mask_crop import MaskCrop
    from oncoseg_node.rtstruct.reader import rasterize_crops

    phantom, path = written(tmp_path, "HFS")
    crops = rasterize_crops(pydicom.dcmread(path), phantom.volume)
    assert set(crops) == set(phantom.truth)
    for name, truth in phantom.truth.items():
        assert crops[name].box == MaskCrop.of(truth).box, name
        assert np.array_equal(crops[name].full(), truth), name
