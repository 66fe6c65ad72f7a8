"""Offline folders as they come out of a planning system or PACS export.

``segment``, ``protocols explain`` and ``evaluate`` run as subprocesses on
folders that hold more than one clean series: a README, a DICOMDIR, an
earlier structure set, a second CT series, anonymised UIDs.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.fileset import FileSet

from oncoseg_node.commissioning.phantom import write_phantom
from oncoseg_node.durable import write_durably
from oncoseg_node.errors import RTStructError
from oncoseg_node.rtstruct.profiles import PROFILES
from oncoseg_node.rtstruct.selfcheck import save_verified
from oncoseg_node.rtstruct.writer import GenerationInfo, RoiMask, build_rtstruct
from tests.conftest import write_config
from tests.peers import dciodvfy

SMALL = dict(slices=24, rows=128, columns=128, pixel_spacing=(3.5, 3.5), slice_thickness=5.0)


def cli(*args: str, config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oncoseg_node.cli", *args, "--config",
                           str(config)], capture_output=True, text=True, timeout=300)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith("oncoseg-node: ") and proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr


def rois(path: Path) -> dict[str, list[tuple[str, tuple[float, ...]]]]:
    """Each ROI's contours: (referenced image, points), in file order."""
    ds = pydicom.dcmread(path)
    names = {r.ROINumber: r.ROIName for r in ds.StructureSetROISequence}
    out = {}
    for roi in ds.ROIContourSequence:
        out[names[roi.ReferencedROINumber]] = [
            (c.ContourImageSequence[0].ReferencedSOPInstanceUID, tuple(c.ContourData))
            for c in roi.get("ContourSequence", [])]
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A clean folder with one CT series, and a messy one holding it among others."""
    root = tmp_path_factory.mktemp("folders")
    clean = root / "clean"
    first = write_phantom(clean, **SMALL)
    second = write_phantom(root / "second", **SMALL, series_description="Thorax 2nd recon",
                           seed=7)
    config = write_config(root)
    earlier = root / "earlier.dcm"
    assert cli("segment", str(clean), "-o", str(earlier), config=config).returncode == 0
    messy = root / "messy"
    shutil.copytree(clean, messy)
    for path in (root / "second").iterdir():
        shutil.copy(path, messy / f"B{path.name}")
    shutil.copy(earlier, messy / "RS_earlier.dcm")
    (messy / "README.txt").write_text("Exported from the planning system for commissioning.\n")
    fileset = FileSet()
    fileset.add(pydicom.dcmread(next(clean.iterdir())))
    fileset.write(root / "media")
    shutil.copy(root / "media" / "DICOMDIR", messy / "DICOMDIR")
    return root, config, first, second


@pytest.mark.peers  # dciodvfy judges the structure set
def test_segment_lists_several_series_and_writes_the_chosen_one_as_on_a_clean_folder(folders):
    root, config, first, second = folders
    messy = root / "messy"
    listed = cli("segment", str(messy), "-o", str(root / "none.dcm"), config=config)
    error = one_line_error(listed)
    assert "holds 2 CT series" in error and "--series" in error
    uid_a, uid_b = first.volume.series_instance_uid, second.volume.series_instance_uid
    for uid, description in ((uid_a, "Phantom thorax HFS"), (uid_b, "Thorax 2nd recon")):
        (row,) = [r for r in listed.stdout.splitlines() if uid in r]
        assert description in row and "24 slices" in row
    assert not (root / "none.dcm").exists()

    chosen = cli("segment", str(messy), "--series", uid_a, "-o", str(root / "messy.dcm"),
                 config=config)
    assert chosen.returncode == 0, chosen.stderr
    assert "skipped 1 non-DICOM file, 1 DICOMDIR" in chosen.stdout
    assert "ignored 1 RTSTRUCT" in chosen.stdout and "1 other CT series" in chosen.stdout
    clean = cli("segment", str(root / "clean"), "-o", str(root / "clean.dcm"), config=config)
    assert clean.returncode == 0, clean.stderr
    ours, reference = rois(root / "messy.dcm"), rois(root / "clean.dcm")
    assert ours == reference and sum(len(c) for c in ours.values()) > 0
    ds = pydicom.dcmread(root / "messy.dcm")
    series = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0] \
        .RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == uid_a
    assert {i.ReferencedSOPInstanceUID for i in series.ContourImageSequence} == set(
        first.volume.sop_instance_uids)
    errors, output = dciodvfy(root / "messy.dcm")
    assert errors == [], output


def test_unknown_series_uid_is_a_one_line_error(folders):
    root, config, _, _ = folders
    error = one_line_error(cli("segment", str(root / "messy"), "--series", "1.2.3", "-o",
                               str(root / "x.dcm"), config=config))
    assert "no CT series 1.2.3" in error


def test_every_argument_is_checked_before_the_series_is_read(folders, tmp_path):
    root, config, _, _ = folders
    clean = str(root / "clean")
    cases = [
        (("segment", clean, "-o", str(tmp_path / "a.dcm"), "--profile", "nosuch"),
         "unknown destination profile 'nosuch'"),
        (("segment", clean, "-o", str(tmp_path / "a.dcm"), "--protocol", "nosuch"),
         "no protocol named 'nosuch'"),
        (("segment", clean, "-o", str(tmp_path / "missing" / "a.dcm")),
         f"output folder {tmp_path / 'missing'} does not exist"),
        (("segment", str(tmp_path / "nope"), "-o", str(tmp_path / "a.dcm")),
         f"{tmp_path / 'nope'}: no such folder"),
    ]
    for args, message in cases:
        proc = cli(*args, config=config)
        assert message in one_line_error(proc), args
        assert proc.stdout == "", (args, proc.stdout)  # nothing was read or contoured
    assert list(tmp_path.iterdir()) == []


def test_output_folder_gets_a_named_file_and_no_hidden_partial(folders, tmp_path):
    root, config, _, _ = folders
    out = tmp_path / "out"
    out.mkdir()
    proc = cli("segment", str(root / "clean"), "-o", str(out), config=config)
    assert proc.returncode == 0, proc.stderr
    (written,) = list(out.iterdir())
    ds = pydicom.dcmread(written)
    assert written.name == f"RS.{ds.SOPInstanceUID}.dcm"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_durable_write_onto_a_folder_leaves_no_partial(tmp_path):
    (tmp_path / "dir").mkdir()
    with pytest.raises(OSError):
        write_durably(tmp_path / "dir", b"data")
    assert [p.name for p in tmp_path.iterdir()] == ["dir"]


def test_empty_type1_attributes_are_refused_with_their_names(tmp_path):
    phantom = write_phantom(tmp_path / "ct", **SMALL)
    for path in (tmp_path / "ct").iterdir():
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = ""
        ds.SeriesInstanceUID = ""
        ds.save_as(path)
    out = tmp_path / "rs.dcm"
    error = one_line_error(cli("segment", str(tmp_path / "ct"), "-o", str(out),
                               config=write_config(tmp_path)))
    assert "empty Type 1 attribute(s): StudyInstanceUID (in 24 of 24), SeriesInstanceUID" \
        in error
    assert not out.exists()
    assert phantom.volume.shape[0] == 24


def test_writer_self_check_fails_on_an_empty_type1_attribute(tmp_path):
    phantom = write_phantom(tmp_path / "ct", **SMALL)
    header = copy.deepcopy(phantom.volume.header)
    header.StudyInstanceUID = ""
    volume = dataclasses.replace(phantom.volume, study_instance_uid="", header=header)
    rois = [RoiMask("External", (0, 255, 0), "EXTERNAL", phantom.truth["External"])]
    info = GenerationInfo(engine="classical", model="test", protocol_name="t",
                          protocol_version="1")
    ds = build_rtstruct(volume, rois, info, PROFILES["generic"])
    with pytest.raises(RTStructError) as caught:
        save_verified(ds, tmp_path / "rs.dcm", volume, PROFILES["generic"])
    assert "Type 1 StudyInstanceUID empty" in str(caught.value)
    assert ("Type 1 ReferencedFrameOfReferenceSequence[*].RTReferencedStudySequence[*]"
            ".ReferencedSOPInstanceUID empty") in str(caught.value)
    good = build_rtstruct(phantom.volume, rois, info, PROFILES["generic"])
    save_verified(good, tmp_path / "good.dcm", phantom.volume, PROFILES["generic"])


def test_protocols_explain_and_evaluate_choose_among_series(folders):
    root, config, first, second = folders
    messy = str(root / "messy")
    listed = cli("protocols", "explain", messy, config=config)
    assert "holds 2 CT series" in one_line_error(listed)
    assert second.volume.series_instance_uid in listed.stdout
    explained = cli("protocols", "explain", messy, "--series",
                    second.volume.series_instance_uid, config=config)
    assert explained.returncode == 0, explained.stderr
    assert "=> thorax" in explained.stdout
    # evaluate takes the series the reference is drawn on
    evaluated = cli("evaluate", "--series", messy, "--reference", str(root / "earlier.dcm"),
                    "--ours", str(root / "earlier.dcm"), config=config)
    assert evaluated.returncode == 0, evaluated.stderr
    assert first.volume.series_instance_uid in evaluated.stdout
    assert "1.000" in evaluated.stdout
    missing = cli("evaluate", "--series", messy, "--reference", str(root / "nope.dcm"),
                  config=config)
    assert "nope.dcm: no such structure set file" in one_line_error(missing)
    no_folder = cli("evaluate", "--series", messy, "--reference", str(root / "earlier.dcm"),
                    "--csv", str(root / "missing" / "out.csv"), config=config)
    assert f"output folder {root / 'missing'} does not exist" in one_line_error(no_folder)
    assert no_folder.stdout == ""  # checked before any case was read
