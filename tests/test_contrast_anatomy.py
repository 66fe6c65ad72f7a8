"""The classical engine on a contrast-enhanced abdomen: what a real one showed it getting wrong.

Each case is a feature of the abdomen phantom built after a real contrast CT
(512^2, 2 mm) was drawn wrong: the aorta touching the vertebral bodies (with
calcified plaque in its wall) and the enhanced vessels beside the spine drawn
as bone, humeri with a thin
cortex drawn without their marrow, and the canal checked to lie behind the
vertebral body in patient coordinates for every patient position. Each of
these tests failed on the engine before it learned to tell them apart. They
are regression checks for those failures, not evidence that the next real
case is right. The phantom's calcified costal cartilages are still drawn as
bone (about half of their volume): the Bones Dice bound counts them.
"""

from __future__ import annotations

import numpy as np
import pytest

from oncoseg_node.commissioning.phantom import make_phantom
from oncoseg_node.contouring.engines.classical.engine import ClassicalEngine
from oncoseg_node.contouring.protocols import Structure

ABDOMEN = {"site": "abdomen", "slices": 40, "rows": 512, "columns": 512,
           "pixel_spacing": (0.9, 0.9), "slice_thickness": 2.0}
POSITIONS = ("HFS", "HFP", "FFS", "FFP")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def share(part: np.ndarray, whole: np.ndarray) -> float:
    return float((part & whole).sum()) / float(whole.sum())


def contour(phantom, names=("Bones", "SpinalCanal")) -> dict[str, np.ndarray]:
    results = ClassicalEngine().segment(phantom.volume, [Structure(n, (0, 0, 0)) for n in names])
    shape = phantom.volume.shape
    return {r.name: (np.zeros(shape, bool) if r.mask is None else r.mask) for r in results}


@pytest.fixture(scope="module")
def abdomen():
    phantom = make_phantom(**ABDOMEN, seed=31)
    return phantom, contour(phantom)


def test_contrast_aorta_touching_the_vertebral_bodies_is_not_bone(abdomen):
    phantom, found = abdomen
    # What stays is the calcified plaque in its wall and its rim against the cortex.
    assert share(found["Bones"], phantom.truth["A_Aorta"]) <= 0.20


def test_enhanced_vessels_beside_the_spine_are_not_bone(abdomen):
    phantom, found = abdomen
    assert share(found["Bones"], phantom.truth["Vessels"]) <= 0.20


def test_abdomen_bones_and_canal(abdomen):
    phantom, found = abdomen
    assert dice(found["Bones"], phantom.truth["Bones"]) >= 0.90
    assert share(found["SpinalCanal"], phantom.truth["SpinalCord"]) >= 0.90
    assert dice(found["SpinalCanal"], phantom.truth["SpinalCanal"]) >= 0.80


@pytest.mark.parametrize("thickness", [2.0, 3.0])
def test_humeri_with_a_thin_cortex_keep_their_marrow(thickness):
    phantom = make_phantom(**{**ABDOMEN, "slices": 24, "slice_thickness": thickness}, seed=32)
    found = contour(phantom, ("Bones",))["Bones"]
    humeri = phantom.truth["Humeri"]
    assert share(found, humeri) >= 0.90


def _patient_y(volume, mask: np.ndarray) -> np.ndarray:
    return np.concatenate([volume.index_to_patient(int(z), *np.nonzero(mask[z]))[:, 1]
                           for z in np.flatnonzero(mask.any(axis=(1, 2)))])


@pytest.mark.parametrize("position", POSITIONS)
def test_the_canal_lies_behind_the_vertebral_body_in_every_position(position):
    phantom = make_phantom(**{**ABDOMEN, "slices": 24}, patient_position=position, seed=33)
    found = contour(phantom)
    canal = found["SpinalCanal"]
    assert canal.any()
    # The vertebral bodies' centre lies at y = 42 mm (LPS, +y posterior); the canal's
    # front 14 mm behind it, the aorta's back 12 mm in front of it.
    assert _patient_y(phantom.volume, canal).min() > 42.0 + 8.0
    assert share(canal, phantom.truth["SpinalCord"]) >= 0.90
    assert share(found["Bones"], phantom.truth["A_Aorta"]) <= 0.20
