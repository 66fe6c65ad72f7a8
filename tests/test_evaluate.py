"""Evaluation metrics on hand-computable cases, and the evaluate command as a subprocess."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from pydicom.dataset import Dataset

from oncoseg_node.commissioning.cases import CaseIdentity, CaseResult
from oncoseg_node.commissioning.evaluate import aggregate, compare
from oncoseg_node.commissioning.report import to_csv, to_html
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
    results = [CaseResult(CaseIdentity(r.case, f"PAT{i}", f"1.2.{i}", "Thorax 3mm", "ct (40 files)",
                                       "reference.dcm", "ours.dcm", "0.1.0", "thorax@abc"), [r])
               for i, r in enumerate(rows)]
    csv_lines = to_csv(results).splitlines()
    assert "Liver" in csv_lines[1] and "PAT0" in csv_lines[1] and "thorax@abc" in csv_lines[1]
    page = to_html(results)
    assert "<svg" in page and "c2" in page and "PAT2" in page and "<script" not in page
    # the distribution plot: one dot per case for each of the five metrics
    assert page.count("<circle") == 3 * 5


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


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oncoseg_node.cli", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.peers
def test_phantom_new_uids_and_reference_walkthrough(tmp_path):
    """The README walkthrough: phantom with its truth as a structure set, then evaluate it."""
    import csv

    import pydicom

    from tests.conftest import write_config
    from tests.peers import dciodvfy

    config = str(write_config(tmp_path))
    series = {}
    for run, extra in (("a", []), ("b", []), ("c", ["--new-uids"]), ("d", ["--new-uids"])):
        proc = _cli("phantom", str(tmp_path / run / "ct"), "--slices", "6", "--size", "128",
                    "--reference", str(tmp_path / run / "reference.dcm"), "--config", config,
                    *extra)
        assert proc.returncode == 0, proc.stderr
        first = pydicom.dcmread(tmp_path / run / "ct" / "CT000001.dcm")
        series[run] = (first.SeriesInstanceUID, first.SOPInstanceUID, first.StudyInstanceUID)
    assert series["a"] == series["b"]        # the same phantom is the same series
    assert len({series["a"], series["c"], series["d"]}) == 3
    assert len({s[1] for s in series.values()}) == 3
    reference = tmp_path / "c" / "reference.dcm"
    errors, output = dciodvfy(reference)
    assert errors == [], output
    rs = pydicom.dcmread(reference)
    ct = pydicom.dcmread(tmp_path / "c" / "ct" / "CT000001.dcm")
    assert rs.FrameOfReferenceUID == ct.FrameOfReferenceUID
    ref_series = (rs.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
                  .RTReferencedSeriesSequence[0].SeriesInstanceUID)
    assert ref_series == series["c"][0]
    names = {item.ROIName for item in rs.StructureSetROISequence}
    assert {"External", "Lung_L", "Lung_R"} <= names

    proc = _cli("evaluate", "--series", str(tmp_path / "c" / "ct"), "--reference", str(reference),
                "--ours", str(reference), "--csv", str(tmp_path / "m.csv"),
                "--html", str(tmp_path / "r.html"), "--config", config)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((tmp_path / "m.csv").open()))
    assert {r["structure"] for r in rows} == names
    for row in rows:
        assert float(row["dice"]) == 1.0 and float(row["surface_dice"]) == 1.0
        assert row["case"] == "c" and row["patient_id"] == "PHANTOM001"
        assert row["series_uid"] == series["c"][0]
        assert row["series_description"] == "Phantom thorax HFS"
        assert "6 files" in row["ct_files"] and row["reference_file"] == str(reference)
        assert row["node_version"] and row["protocol"]
    page = (tmp_path / "r.html").read_text()
    assert "PHANTOM001" in page and series["c"][0] in page
    assert "patient PHANTOM001" in proc.stdout
