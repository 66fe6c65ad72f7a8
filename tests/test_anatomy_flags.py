"""Sanity flags for impossible anatomy, on masks built straight from the phantom's truth.

The checks read only the final masks and the HU, so no engine runs here: the
truth is the anatomy that must pass, and the truth made impossible (the
canal moved in front of the vertebral body, the contrast-filled aorta added
to Bones) must be flagged, in every patient position.
"""

from __future__ import annotations

import html
import re

import numpy as np
import pytest
from scipy import ndimage

from oncoseg_node.commissioning.phantom import Phantom, make_phantom
from oncoseg_node.config import load_config
from oncoseg_node.contouring.engines.base import StructureResult
from oncoseg_node.contouring.engines.registry import build_engines
from oncoseg_node.contouring.geometry import check_series
from oncoseg_node.contouring.mask_crop import MaskCrop
from oncoseg_node.contouring.pipeline import Contoured
from oncoseg_node.contouring.protocols import Structure, load_protocols
from oncoseg_node.contouring.sanity import flag_results, patient_centroid
from oncoseg_node.ledger import Ledger
from oncoseg_node.ops.jobs_page import JobView, render_job_page
from oncoseg_node.rtstruct.draft import FLAGS_NOTE_LIMIT, description_notes, write_structure_set
from oncoseg_node.rtstruct.profiles import get_profile
from tests.conftest import REPO, write_config

POSITIONS = ("HFS", "HFP", "FFS", "FFP")
ABDOMEN = {"site": "abdomen", "slices": 40, "rows": 512, "columns": 512,
           "pixel_spacing": (0.78, 0.78), "slice_thickness": 2.0}
CANAL_SHIFT_MM = 50.0  # from behind the vertebral body to in front of it
TUBE = "Bones holds a homogeneous round tube of"


@pytest.fixture(scope="module")
def abdomen() -> dict[str, Phantom]:
    return {p: make_phantom(**ABDOMEN, seed=7, patient_position=p) for p in POSITIONS}


@pytest.fixture(scope="module")
def sites() -> dict[str, Phantom]:
    """The other sites at their default sizes (96 slices of 512 x 512)."""
    return {site: make_phantom(site=site, seed=5) for site in ("thorax", "pelvis", "head")}


def results_of(masks: dict[str, np.ndarray]) -> tuple[list[Structure], list[StructureResult]]:
    """Structures with no expected volume or side: only the anatomy checks can flag them."""
    structures = [Structure(name, (255, 0, 0)) for name in masks]
    return structures, [StructureResult(name, mask) for name, mask in masks.items()]


def flags_of(phantom: Phantom, masks: dict[str, np.ndarray]) -> dict[str, tuple[str, ...]]:
    structures, results = results_of(masks)
    return {r.name: r.flags for r in flag_results(phantom.volume, structures, results)
            if r.flags}


def canal_moved_forward(phantom: Phantom) -> np.ndarray:
    """The truth canal moved CANAL_SHIFT_MM toward the patient's front (patient -y)."""
    volume = phantom.volume
    y_per_row = volume.col_direction[1] * volume.pixel_spacing[0]
    rows = int(round(-CANAL_SHIFT_MM / y_per_row))
    moved = np.roll(phantom.truth["SpinalCanal"], rows, axis=1)
    # the roll must not wrap round the image: the canal is far from its edges
    assert moved.sum() == phantom.truth["SpinalCanal"].sum()
    return moved


@pytest.mark.parametrize("position", POSITIONS)
def test_the_canal_in_front_of_the_vertebral_body_is_flagged(abdomen, position):
    phantom = abdomen[position]
    truth, volume = phantom.truth, phantom.volume
    moved = canal_moved_forward(phantom)
    canal_y = patient_centroid(volume, MaskCrop.of(truth["SpinalCanal"]))[1]
    assert patient_centroid(volume, MaskCrop.of(moved))[1] == pytest.approx(
        canal_y - CANAL_SHIFT_MM, abs=1.0)
    # in front of the vertebral body: anterior to every bone voxel near the midline
    z, r, c = np.nonzero(truth["Bones"])
    bone = volume.index_to_patient(z, r, c)
    z, r, c = np.nonzero(moved)
    assert volume.index_to_patient(z, r, c)[:, 1].max() < \
        bone[np.abs(bone[:, 0]) < 12.0][:, 1].min()
    slices = int(moved.any(axis=(1, 2)).sum())
    expected = f"SpinalCanal not behind the vertebral body on {slices} of {slices} slices"
    # the bone in front is read from Bones when drawn, else from HU within the body
    for bones in ({"Bones": truth["Bones"]}, {}):
        masks = {"External": truth["External"], **bones}
        assert flags_of(phantom, {**masks, "SpinalCanal": moved}) == \
            {"SpinalCanal": (expected,)}
        assert flags_of(phantom, {**masks, "SpinalCanal": truth["SpinalCanal"]}) == {}


@pytest.mark.parametrize("position", ["HFS", "FFP"])
def test_the_contrast_filled_aorta_in_bones_is_flagged(abdomen, position):
    truth = abdomen[position].truth
    with_aorta = truth["Bones"] | truth["A_Aorta"]
    # the aorta leans on the vertebral bodies: it is part of a bone's component
    labels, _ = ndimage.label(with_aorta)
    assert set(np.unique(labels[truth["A_Aorta"]])) & \
        set(np.unique(labels[truth["Bones"] & ~truth["A_Aorta"]]))
    flags = flags_of(abdomen[position], {"Bones": with_aorta})
    assert list(flags) == ["Bones"] and len(flags["Bones"]) == 1
    found = re.fullmatch(r"Bones holds a homogeneous round tube of (\d+) HU over (\d+) mm "
                         r"\(a contrast-filled vessel\?\)", flags["Bones"][0])
    assert found, flags
    hu, mm = float(found[1]), float(found[2])
    aorta_hu = abdomen[position].volume.hu[truth["A_Aorta"]].astype(float)
    assert abs(hu - aorta_hu.mean()) < 25.0  # the vessel's contrast, not bone
    assert mm == pytest.approx(40 * 2.0, abs=2.0)  # the whole scanned length
    assert flags_of(abdomen[position], {"Bones": truth["Bones"]}) == {}


def test_the_thorax_aorta_in_bones_is_flagged(sites):
    truth = sites["thorax"].truth
    flags = flags_of(sites["thorax"], {"Bones": truth["Bones"] | truth["A_Aorta"]})
    assert flags["Bones"][0].startswith(TUBE)


@pytest.mark.parametrize("position", POSITIONS)
def test_abdomen_truth_raises_no_flag(abdomen, position):
    truth = abdomen[position].truth
    assert flags_of(abdomen[position], truth) == {}
    assert flags_of(abdomen[position], {k: v for k, v in truth.items() if k != "Bones"}) == {}


@pytest.mark.parametrize("site", ["thorax", "pelvis", "head"])
def test_other_sites_truth_raises_no_flag(sites, site):
    truth = sites[site].truth
    assert flags_of(sites[site], truth) == {}
    assert flags_of(sites[site], {k: v for k, v in truth.items() if k != "Bones"}) == {}


def test_a_flag_reaches_the_job_record_its_page_and_the_structure_set(tmp_path, abdomen):
    phantom = abdomen["HFS"]
    config = load_config(write_config(tmp_path))
    protocols = load_protocols(config.protocols)
    protocol = protocols.by_name("abdomen")
    drawn = {"External": phantom.truth["External"], "SpinalCanal": phantom.truth["SpinalCanal"],
             "Bones": phantom.truth["Bones"] | phantom.truth["A_Aorta"]}
    results = [StructureResult(s.name, drawn.get(s.name)) for s in protocol.structures]
    contoured = Contoured(phantom.volume, protocol,
                          flag_results(phantom.volume, protocol.structures, results),
                          check_series(phantom.datasets))
    (message,) = next(r.flags for r in contoured.results if r.name == "Bones")
    assert message.startswith(TUBE)

    ds = write_structure_set(contoured, protocols, build_engines(config.engine),
                             get_profile("generic"), tmp_path / "rs.dcm", label="AUTO J1 V1")
    description = str(ds.StructureSetDescription)
    assert f"Sanity flags (1): Bones: {message}." in description
    assert description.startswith("Automatic contours, not approved")
    assert "protocol abdomen version" in description  # the generation details still fit

    ledger = Ledger(tmp_path / "ledger.sqlite3")
    try:
        first = phantom.datasets[0]
        ledger.record_instance(sop_instance_uid=str(first.SOPInstanceUID),
                               series_uid=str(first.SeriesInstanceUID),
                               study_uid=str(first.StudyInstanceUID),
                               sop_class_uid=str(first.SOPClassUID), relpath="ct/1.dcm",
                               sha256="0" * 64, size=1, calling_ae="CTSIM")
        job_id = ledger.close_series(str(first.SeriesInstanceUID))
        assert job_id is not None
        ledger.update_job(job_id, protocol="abdomen", results=contoured.summary())
        job = ledger.job(job_id)
        assert job is not None and job.results is not None
        row = next(r for r in job.results if r["name"] == "Bones")
        assert row["flags"] == [message]
        page = render_job_page(JobView(job), None)
        assert f'<span class="flag">{html.escape(message)}</span>' in page
    finally:
        ledger.close()


def test_many_flags_are_summarised_in_the_structure_set_description(abdomen):
    phantom = abdomen["HFS"]
    flag = "volume 3.2 cc outside expected 300-1200 cc"
    results = [StructureResult(f"Organ{i}", phantom.truth["SpinalCanal"], flags=(flag, flag))
               for i in range(12)]
    protocol = load_protocols(REPO / "config" / "protocols.yaml").by_name("abdomen")
    contoured = Contoured(phantom.volume, protocol, results, check_series(phantom.datasets))
    (note,) = description_notes(contoured)
    assert len(note) <= FLAGS_NOTE_LIMIT
    assert note == ("Sanity flags (24) on " + ", ".join(r.name for r in results)
                    + ": see the job page.")
