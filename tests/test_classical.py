from __future__ import annotations

import numpy as np
import pytest

from oncoseg_node.engines.classical import ClassicalEngine
from oncoseg_node.phantom import make_phantom
from oncoseg_node.protocols import PostProcess, Structure

NAMES = ("External", "Lung_L", "Lung_R", "Lungs", "Bones", "SpinalCanal")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def run(phantom, names=NAMES):
    results = ClassicalEngine().segment(phantom.volume, [Structure(n, (0, 0, 0)) for n in names])
    return {r.name: r for r in results}


@pytest.mark.parametrize("position", ["HFS", "HFP", "FFS", "FFP"])
def test_thorax_structures_meet_their_dice_and_laterality(position):
    p = make_phantom(slices=30, rows=192, columns=192, pixel_spacing=(2.6, 2.6),
                     patient_position=position, seed=3)
    r = run(p)
    assert dice(r["External"].mask, p.truth["External"]) >= 0.97
    assert dice(r["Lung_L"].mask, p.truth["Lung_L"]) >= 0.95
    assert dice(r["Lung_R"].mask, p.truth["Lung_R"]) >= 0.95
    assert dice(r["Bones"].mask, p.truth["Bones"]) >= 0.90
    assert dice(r["SpinalCanal"].mask, p.truth["SpinalCanal"]) >= 0.80
    # laterality: the left lung must not overlap the right truth at all
    assert not np.logical_and(r["Lung_L"].mask, p.truth["Lung_R"]).any()


def test_couch_and_airways_are_excluded():
    p = make_phantom(slices=20, rows=192, columns=192, pixel_spacing=(2.6, 2.6))
    r = run(p)
    couch = (p.volume.hu > -500) & ~p.truth["External"]
    assert couch.sum() > 1000  # the phantom has a couch to exclude
    assert not np.logical_and(r["External"].mask, couch).any()
    assert not np.logical_and(r["Lungs"].mask, p.truth["Trachea"]).any()


@pytest.mark.parametrize("site", ["head", "pelvis"])
def test_no_lungs_in_the_field_gives_absent_lungs(site):
    p = make_phantom(slices=16, rows=128, columns=128, pixel_spacing=(4.0, 4.0), site=site)
    r = run(p)
    for name in ("Lung_L", "Lung_R", "Lungs"):
        assert r[name].absent and r[name].note == "not found in this series"
    assert dice(r["External"].mask, p.truth["External"]) >= 0.97


def test_unsupported_structure_is_reported_absent():
    p = make_phantom(slices=4, rows=64, columns=64, pixel_spacing=(6.0, 6.0))
    (result,) = ClassicalEngine().segment(p.volume, [Structure("Parotid_L", (0, 0, 0))])
    assert result.absent and "not supported" in result.note


def test_postprocess_keeps_the_largest_component():
    p = make_phantom(slices=20, rows=128, columns=128, pixel_spacing=(3.9, 3.9))
    only_one = Structure("Lungs", (0, 0, 0), postprocess=PostProcess(keep_components=1))
    (result,) = ClassicalEngine().segment(p.volume, [only_one])
    from scipy import ndimage
    assert ndimage.label(result.mask)[1] == 1
