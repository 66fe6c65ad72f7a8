"""Evaluation metrics on hand-computable cases, and the evaluate command as a subprocess."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from pydicom.dataset import Dataset

from oncoseg_node.commissioning.evaluate import aggregate, compare, to_csv, to_html
from oncoseg_node.contouring.volume import Volume


def grid(n: int = 40, spacing: float = 1.0) -> Volume:
    positions = np.array([[0.0, 0.0, k * spacing] for k in range(n)])
    return Volume(hu=np.zeros((n, n, n), dtype=np.float32), positions=positions,
                  row_direction=np.array([1.0, 0, 0]), col_direction=np.array([0, 1.0, 0]),
                  pixel_spacing=(spacing, spacing), sop_instance_uids=tuple(map(str, range(n))),
                  sop_class_uid="1.2.840.10008.5.1.4.1.1.2", study_instance_uid="1",
                  series_instance_uid="2", frame_of_reference_uid="3", patient_position="HFS",
                  header=Dataset())


def cube(volume: Volume, start: tuple[int, int, int], size: int) -> np.ndarray:
    mask = np.zeros(volume.shape, dtype=bool)
    z, y, x = start
    mask[z:z + size, y:y + size, x:x + size] = True
    return mask


def test_identical_masks_are_perfect():
    v = grid()
    a = cube(v, (5, 5, 5), 10)
    m = compare(v, a, a)
    assert m.dice == 1.0 and m.hd95_mm == 0.0 and m.msd_mm == 0.0 and m.surface_dice == 1.0
    assert m.volume_ours_cc == pytest.approx(1.0)  # 1000 voxels of 1 mm^3


def test_cube_shifted_by_two_voxels_has_known_dice_and_hausdorff():
    v = grid()
    a = cube(v, (5, 5, 5), 10)
    b = cube(v, (5, 5, 7), 10)  # shifted 2 mm along x
    m = compare(v, a, b, tolerance_mm=2.0)
    assert m.dice == pytest.approx(2 * 800 / 2000)  # overlap 10 x 10 x 8
    assert m.hd95_mm == pytest.approx(2.0)          # no surface point is farther than 2 mm
    assert 0 < m.msd_mm < 2.0
    assert m.surface_dice == 1.0                    # everything within the 2 mm tolerance
    assert compare(v, a, b, tolerance_mm=1.0).surface_dice < 1.0


def test_spacing_scales_distances():
    v = grid(spacing=2.5)
    a = cube(v, (5, 5, 5), 10)
    b = cube(v, (5, 5, 6), 10)  # one voxel = 2.5 mm
    assert compare(v, a, b).hd95_mm == pytest.approx(2.5)


def test_missing_structure_has_infinite_distance_and_zero_dice():
    v = grid()
    m = compare(v, np.zeros(v.shape, bool), cube(v, (5, 5, 5), 4))
    assert m.dice == 0.0 and m.hd95_mm == float("inf") and m.surface_dice == 0.0


def test_reports_and_aggregation():
    v = grid()
    a = cube(v, (5, 5, 5), 10)
    rows = [compare(v, a, cube(v, (5, 5, 5 + s), 10), case=f"c{s}", structure="Liver")
            for s in (0, 1, 2)]
    (entry,) = aggregate(rows)
    assert entry["cases"] == 3 and entry["dice"][0] == pytest.approx(0.9)
    assert "Liver" in to_csv(rows).splitlines()[1]
    assert "<svg" in to_html(rows) and "c2" in to_html(rows)


def test_evaluate_command_on_the_phantom(tmp_path):
    from oncoseg_node.commissioning.phantom import write_phantom
    from oncoseg_node.rtstruct.profiles import PROFILES
    from oncoseg_node.rtstruct.selfcheck import save_verified
    from oncoseg_node.rtstruct.writer import GenerationInfo, RoiMask, build_rtstruct
    from tests.conftest import write_config

    phantom = write_phantom(tmp_path / "ct", slices=12, rows=128, columns=128,
                            pixel_spacing=(3.5, 3.5))
    truth = [RoiMask("BODY", (0, 255, 0), "EXTERNAL", phantom.truth["External"]),
             RoiMask("Lung_L", (0, 0, 255), "ORGAN", phantom.truth["Lung_L"])]
    ds = build_rtstruct(phantom.volume, truth, GenerationInfo("manual", "-", "-", "-"),
                        PROFILES["generic"])
    save_verified(ds, tmp_path / "reference.dcm", phantom.volume, PROFILES["generic"])
    (tmp_path / "alias.yaml").write_text("BODY: External\n")
    proc = subprocess.run(
        [sys.executable, "-m", "oncoseg_node.cli", "evaluate", "--series", str(tmp_path / "ct"),
         "--reference", str(tmp_path / "reference.dcm"), "--alias-map",
         str(tmp_path / "alias.yaml"), "--csv", str(tmp_path / "m.csv"), "--html",
         str(tmp_path / "r.html"), "--config", str(write_config(tmp_path))],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split(",")[1]: line.split(",") for line in
            (tmp_path / "m.csv").read_text().splitlines()[1:]}
    assert set(rows) == {"External", "Lung_L"}
    assert float(rows["External"][2]) >= 0.97 and float(rows["Lung_L"][2]) >= 0.95
    assert "External" in proc.stdout and (tmp_path / "r.html").read_text().startswith("<!doctype")


def test_evaluate_folder_of_cases_aggregates(tmp_path):
    import shutil

    from oncoseg_node.commissioning.phantom import write_phantom
    from oncoseg_node.rtstruct.profiles import PROFILES
    from oncoseg_node.rtstruct.selfcheck import save_verified
    from oncoseg_node.rtstruct.writer import GenerationInfo, RoiMask, build_rtstruct

    for seed in (1, 2):
        case = tmp_path / "cases" / f"case{seed}"
        phantom = write_phantom(case / "ct", slices=6, rows=64, columns=64,
                                pixel_spacing=(7.0, 7.0), seed=seed)
        ds = build_rtstruct(phantom.volume, [RoiMask("External", (0, 255, 0), "EXTERNAL",
                                                     phantom.truth["External"])],
                            GenerationInfo("manual", "-", "-", "-"), PROFILES["generic"])
        save_verified(ds, case / "reference.dcm", phantom.volume, PROFILES["generic"])
        shutil.copy(case / "reference.dcm", case / "ours.dcm")
    proc = subprocess.run([sys.executable, "-m", "oncoseg_node.cli", "evaluate", "--cases",
                           str(tmp_path / "cases")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "External         n=2  Dice 1.000 [1.000-1.000]  HD95 0.00" in proc.stdout
