from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from oncoseg_node.commissioning.phantom import make_phantom
from oncoseg_node.contouring.engines.base import Engine
from oncoseg_node.contouring.engines.classical import engine as classical
from oncoseg_node.contouring.engines.classical.engine import ClassicalEngine
from oncoseg_node.contouring.engines.classical.morphology import dilate, erode, fill_holes
from oncoseg_node.contouring.engines.classical.postprocess import postprocess
from oncoseg_node.contouring.protocols import PostProcess, Structure

NAMES = ("External", "Lung_L", "Lung_R", "Lungs", "Bones", "SpinalCanal")
POSITIONS = ("HFS", "HFP", "FFS", "FFP")
MEDIUM = {"slices": 40, "rows": 256, "columns": 256, "pixel_spacing": (1.95, 1.95)}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def run(phantom, names=NAMES):
    results = ClassicalEngine().segment(phantom.volume, [Structure(n, (0, 0, 0)) for n in names])
    assert [r.name for r in results] == list(names)
    return {r.name: r for r in results}


def mean_patient_x(volume, mask: np.ndarray) -> float:
    xs = [volume.index_to_patient(int(z), *np.nonzero(mask[z]))[:, 0]
          for z in np.flatnonzero(mask.any(axis=(1, 2)))]
    return float(np.concatenate(xs).mean())


def check_thorax(p, r) -> None:
    assert dice(r["External"].mask, p.truth["External"]) >= 0.97
    assert dice(r["Lung_L"].mask, p.truth["Lung_L"]) >= 0.95
    assert dice(r["Lung_R"].mask, p.truth["Lung_R"]) >= 0.95
    assert dice(r["Lungs"].mask, p.truth["Lungs"]) >= 0.95
    assert dice(r["Bones"].mask, p.truth["Bones"]) >= 0.90
    assert dice(r["SpinalCanal"].mask, p.truth["SpinalCanal"]) >= 0.80
    # Laterality in the patient's sense: the left lung at larger LPS x than the right.
    assert mean_patient_x(p.volume, r["Lung_L"].mask) > 30.0
    assert mean_patient_x(p.volume, r["Lung_R"].mask) < -30.0


def test_the_engine_satisfies_the_protocol():
    engine = ClassicalEngine()
    assert isinstance(engine, Engine) and engine.name == "classical"
    assert "no model weights" in engine.description
    assert engine.supports(Structure("Lung_L", (0, 0, 0)))
    assert not engine.supports(Structure("Parotid_L", (0, 0, 0)))


@pytest.mark.parametrize("position", ["HFS", "HFP", "FFS", "FFP"])
def test_thorax_structures_meet_their_dice_and_laterality(position):
    p = make_phantom(**MEDIUM, patient_position=position, seed=3)
    check_thorax(p, run(p))


def test_full_resolution_thorax():
    p = make_phantom(slices=24, patient_position="FFP")
    check_thorax(p, run(p))


def test_tilted_anisotropic_non_uniform_geometry():
    offsets = np.concatenate([np.arange(0, 60, 2.0), np.arange(60, 120, 5.0)])
    p = make_phantom(slices=len(offsets), rows=200, columns=256, pixel_spacing=(2.5, 1.95),
                     slice_offsets=offsets, gantry_tilt_deg=12.0, patient_position="HFP")
    check_thorax(p, run(p))


def test_couch_touching_the_back_is_cut_off():
    p = make_phantom(**MEDIUM, variant="slim")  # a flat couch and no mattress
    r = run(p, ("External",))
    couch = (p.volume.hu > classical.BODY_HU) & ~p.truth["External"]
    grown = ndimage.binary_dilation(p.truth["External"], structure=np.ones((1, 3, 3)))
    assert (couch & grown).sum() > 1000  # the couch really touches the body
    # Only partial-volume pixels at the line of contact may be taken, nothing beyond.
    assert not (r["External"].mask & ~grown).any()
    assert (r["External"].mask & couch).sum() < 0.0005 * r["External"].mask.sum()
    # One body outline per slice, no holes.
    for z in range(p.volume.shape[0]):
        assert ndimage.label(r["External"].mask[z])[1] == 1
    assert np.array_equal(fill_holes(r["External"].mask), r["External"].mask)


def test_head_mask_and_headrest_are_not_external():
    p = make_phantom(**MEDIUM, site="head", patient_position="HFP")
    r = run(p, ("External", "Bones"))
    mask_shell = (p.volume.hu > classical.BODY_HU) & ~p.truth["External"]
    assert mask_shell.sum() > 1000
    assert (r["External"].mask & mask_shell).sum() < 0.001 * r["External"].mask.sum()
    assert dice(r["External"].mask, p.truth["External"]) >= 0.97
    assert dice(r["Bones"].mask, p.truth["Bones"]) >= 0.90


def test_airways_are_not_lung_but_vessels_inside_it_are():
    p = make_phantom(**MEDIUM)
    r = run(p, ("Lungs",))
    lungs = r["Lungs"].mask
    airways = p.truth["Trachea"] | p.truth["Bronchus"]
    assert airways.sum() > 1000
    assert (lungs & airways).sum() < 0.02 * airways.sum()
    # The bronchi run inside the lungs: on some slices a lung encloses one, so
    # filling the lung's holes alone would take it in.
    assert (fill_holes(p.truth["Lung_L"]) & p.truth["Bronchus"]).sum() > 50
    vessels = p.truth["Lungs"] & (p.volume.hu > classical.LUNG_HU)
    assert vessels.sum() > 200
    assert (lungs & vessels).sum() >= 0.8 * vessels.sum()


def test_lungs_joined_at_the_anterior_junction_are_split_at_it():
    # At 2.6 mm pixels the 2 mm septum between the lungs is not sampled: they touch.
    p = make_phantom(slices=30, rows=192, columns=192, pixel_spacing=(2.6, 2.6))
    aerated = (p.volume.hu < classical.LUNG_HU) & p.truth["External"]
    airways = ndimage.binary_dilation(p.truth["Trachea"] | p.truth["Bronchus"], iterations=2)
    labels, _ = ndimage.label(aerated & ~airways)
    joined = set(np.unique(labels[p.truth["Lung_L"]])) & set(np.unique(labels[p.truth["Lung_R"]]))
    assert joined - {0}
    r = run(p, ("Lung_L", "Lung_R"))
    assert (r["Lung_L"].mask & p.truth["Lung_R"]).sum() < 20
    assert (r["Lung_R"].mask & p.truth["Lung_L"]).sum() < 20
    assert dice(r["Lung_L"].mask, p.truth["Lung_L"]) >= 0.95


@pytest.mark.parametrize("site", ["head", "pelvis"])
def test_no_lungs_in_the_field_gives_absent_lungs(site):
    p = make_phantom(**MEDIUM, site=site)
    gas = (p.volume.hu < classical.GAS_HU) & p.truth["External"]
    if site == "pelvis":  # bowel gas bigger than the smallest lung we accept
        assert p.volume.mask_volume_cc(gas) > classical.MIN_LUNG_CC
    r = run(p)
    for name in ("Lung_L", "Lung_R", "Lungs"):
        assert r[name].mask is None and r[name].note == "not found in this series"
    assert dice(r["External"].mask, p.truth["External"]) >= 0.97
    assert dice(r["Bones"].mask, p.truth["Bones"]) >= 0.90


def test_pelvis_canal_only_where_the_lumbar_spine_is():
    p = make_phantom(**MEDIUM, site="pelvis")
    r = run(p, ("SpinalCanal",))
    assert dice(r["SpinalCanal"].mask, p.truth["SpinalCanal"]) >= 0.80
    truth_slices = p.truth["SpinalCanal"].any(axis=(1, 2))
    assert not r["SpinalCanal"].mask[~truth_slices].any()


def test_unsupported_structure_is_reported_absent():
    p = make_phantom(slices=4, rows=64, columns=64, pixel_spacing=(6.0, 6.0))
    (result,) = ClassicalEngine().segment(p.volume, [Structure("Parotid_L", (0, 0, 0))])
    assert result.absent and result.note == "not supported by the classical engine"


def test_protocol_postprocess_is_applied():
    p = make_phantom(**MEDIUM)
    one = Structure("Lungs", (0, 0, 0), postprocess=PostProcess(keep_components=1))
    (result,) = ClassicalEngine().segment(p.volume, [one])
    assert ndimage.label(result.mask)[1] == 1
    assert dice(result.mask, p.truth["Lung_R"]) >= 0.95  # the right lung is the larger
    tiny = Structure("Bones", (0, 0, 0), postprocess=PostProcess(min_island_cc=2.0))
    (bones,) = ClassicalEngine().segment(p.volume, [tiny])
    labels, count = ndimage.label(bones.mask)
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, np.arange(1, count + 1))
    assert sizes.min() * p.volume.voxel_volume_mm3[0] / 1000 >= 2.0


def test_slice_specks_under_the_configured_area_are_dropped():
    p = make_phantom(slices=4, rows=64, columns=64, pixel_spacing=(2.0, 2.0))
    mask = np.zeros(p.volume.shape, dtype=bool)
    mask[1, 10:30, 10:30] = True  # 1600 mm^2
    mask[1, 40:42, 40:42] = True  # 16 mm^2: a speck on the same slice
    mask[2, 50, 50] = True        # 4 mm^2 alone on its slice
    rules = PostProcess(min_slice_island_mm2=20.0)
    out = postprocess(p.volume, mask, rules)
    expected = np.zeros_like(mask)
    expected[1, 10:30, 10:30] = True
    assert np.array_equal(out, expected)
    assert np.array_equal(postprocess(p.volume, mask, PostProcess()), mask)


def test_segment_is_pure():
    p = make_phantom(slices=12, rows=128, columns=128, pixel_spacing=(3.9, 3.9))
    before = p.volume.hu.copy()
    a = run(p)
    b = run(p)
    assert np.array_equal(p.volume.hu, before)
    assert all(np.array_equal(a[n].mask, b[n].mask) for n in NAMES)


@pytest.mark.parametrize("radius", [(0, 1), (1, 1), (2, 3), (5, 2), (7, 7)])
def test_shift_morphology_matches_scipy(radius):
    rng = np.random.default_rng(1)
    mask = rng.random((3, 40, 50)) > 0.93
    ry, rx = radius
    box = np.zeros((1, 2 * ry + 1, 2 * rx + 1), dtype=bool)
    box[0] = True
    assert np.array_equal(dilate(mask, ry, rx), ndimage.binary_dilation(mask, box))
    dense = rng.random((3, 40, 50)) > 0.05
    assert np.array_equal(erode(dense, ry, rx),
                          ndimage.binary_erosion(dense, box, border_value=1))


def test_fill_holes_matches_scipy_per_slice():
    rng = np.random.default_rng(2)
    mask = ndimage.binary_dilation(rng.random((4, 60, 60)) > 0.97, np.ones((1, 5, 5)))
    expected = np.stack([ndimage.binary_fill_holes(s) for s in mask])
    assert np.array_equal(fill_holes(mask), expected)


@pytest.mark.parametrize("position", ["HFS", "FFP"])
def test_trachea_and_main_bronchi_come_from_the_airway_tree(position):
    p = make_phantom(**MEDIUM, patient_position=position)
    r = run(p, ("Trachea", "Bronchus", "Lungs"))
    assert dice(r["Trachea"].mask, p.truth["Trachea"]) >= 0.85
    assert dice(r["Bronchus"].mask, p.truth["Bronchus"]) >= 0.75
    assert not (r["Trachea"].mask & r["Lungs"].mask).any()
    # Oesophageal gas is outside the lungs too, but it is not an airway.
    assert not (r["Trachea"].mask & p.truth["Esophagus"]).any()


def test_no_airways_without_lungs():
    p = make_phantom(**MEDIUM, site="pelvis")  # colon gas as large as a small lung
    r = run(p, ("Trachea", "Bronchus"))
    assert r["Trachea"].absent and r["Bronchus"].absent


@pytest.mark.parametrize("variant", ["standard", "slim", "large"])
@pytest.mark.parametrize("position", POSITIONS)
def test_harder_phantom_across_patients_and_positions(variant, position):
    """Three patients (bone density, contrast, arms, couch, noise) in four positions.

    512 x 512 at 0.98 mm and 3 mm slices, as a planning CT is taken; the
    thresholds are the acceptance figures, the same for every patient.
    """
    p = make_phantom(slices=30, patient_position=position, variant=variant)
    r = run(p, (*NAMES, "Trachea"))
    assert dice(r["External"].mask, p.truth["External"]) >= 0.98
    for name in ("Lung_L", "Lung_R", "Lungs"):
        assert dice(r[name].mask, p.truth[name]) >= 0.97, name
    assert dice(r["Bones"].mask, p.truth["Bones"]) >= 0.90
    assert dice(r["SpinalCanal"].mask, p.truth["SpinalCanal"]) >= 0.90
    assert dice(r["Trachea"].mask, p.truth["Trachea"]) >= 0.85
    assert mean_patient_x(p.volume, r["Lung_L"].mask) > 30.0


@pytest.mark.parametrize("variant", ["standard", "large"])
def test_contrast_and_metal_are_not_bone(variant):
    p = make_phantom(slices=30, variant=variant)
    bones = run(p, ("Bones",))["Bones"].mask
    aorta = p.truth["A_Aorta"]
    assert np.median(p.volume.hu[aorta]) > 250  # iodine as dense as bone
    assert (bones & aorta).sum() < 0.05 * aorta.sum()
    metal = p.volume.hu > 2500
    assert metal.sum() > 50
    assert not (bones & metal).any()
    pelvis = make_phantom(slices=30, site="pelvis", variant=variant)
    bones = run(pelvis, ("Bones",))["Bones"].mask
    loops = (pelvis.volume.hu > 200) & ~pelvis.truth["Bones"] & pelvis.truth["External"] \
        & (pelvis.volume.hu < 1000)
    loops = ndimage.binary_erosion(loops, np.ones((1, 3, 3), bool))  # their core, not bone rims
    assert loops.sum() > 2000
    assert (bones & loops).sum() < 0.05 * loops.sum()
    assert dice(bones, pelvis.truth["Bones"]) >= 0.88


def test_marrow_is_filled_inside_each_bone():
    p = make_phantom(slices=30, variant="slim")  # marrow at 110 HU, a thin cortex
    bones = run(p, ("Bones",))["Bones"].mask
    marrow = p.truth["Bones"] & (p.volume.hu < 180) & (p.volume.hu > 60)
    marrow = ndimage.binary_erosion(marrow, np.ones((1, 3, 3), bool))
    assert marrow.sum() > 5000
    assert (bones & marrow).sum() >= 0.85 * marrow.sum()


@pytest.mark.parametrize("variant", ["standard", "large"])
def test_curved_couch_and_mattress_are_not_external(variant):
    p = make_phantom(**MEDIUM, variant=variant)
    body = run(p, ("External",))["External"].mask
    devices = (p.volume.hu > -950) & ~p.truth["External"]
    devices = ndimage.binary_erosion(devices, np.ones((1, 3, 3), bool))
    assert devices.sum() > 5000  # couch shells and foam mattress, below the patient
    assert (body & devices).sum() < 0.001 * body.sum()


def test_a_real_vertebra_from_pydicom_test_data():
    """pydicom's CT_small.dcm: a real lumbar vertebra (128 x 128 crop at 0.66 mm, 5 mm).

    No reference contours come with it, so this checks what the eye sees: the
    vertebral body solid (marrow filled, not speckle), the canal found behind
    it and kept out of the bone, the enhanced aorta in front not taken as bone.
    The one slice is stacked six times so the canal can be followed in 3D.
    """
    import copy

    import pydicom
    from pydicom.data import get_testdata_file

    from oncoseg_node.contouring.volume import volume_from_datasets

    original = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    stack = []
    for k in range(6):
        ds = copy.deepcopy(original)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 5.0 * k]
        ds.SOPInstanceUID = f"{original.SOPInstanceUID}.{k + 1}"
        ds.InstanceNumber = k + 1
        stack.append(ds)
    volume = volume_from_datasets(stack)
    r = {res.name: res for res in ClassicalEngine().segment(
        volume, [Structure(n, (0, 0, 0)) for n in ("Bones", "SpinalCanal")])}
    bones, canal = r["Bones"].mask[2], r["SpinalCanal"].mask[2]
    mm2 = float(volume.pixel_spacing[0] * volume.pixel_spacing[1])
    labels, count = ndimage.label(bones)
    vertebra = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    assert vertebra.sum() * mm2 > 700
    assert (ndimage.binary_fill_holes(vertebra) & ~vertebra).sum() * mm2 < 10
    assert 100 < canal.sum() * mm2 < 300 and not (canal & bones).any()
    at = [volume.index_to_patient(2, *np.nonzero(m)).mean(axis=0) for m in (vertebra, canal)]
    assert at[1][1] > at[0][1]  # the canal is posterior (+y) of the vertebra's centre
    aorta = (slice(2, 16), slice(88, 105))
    assert np.median(volume.hu[2][aorta]) > 120  # enhanced, in front of the spine
    assert not bones[aorta].any()


@pytest.mark.parametrize("variant", ["standard", "slim", "large"])
def test_no_spine_in_the_series_gives_no_canal(variant):
    p = make_phantom(slices=30, site="head", variant=variant)  # skull, brain, no vertebrae
    (canal,) = ClassicalEngine().segment(p.volume, [Structure("SpinalCanal", (0, 0, 0))])
    assert canal.absent and canal.note == "not found in this series"


@pytest.mark.parametrize(("thickness", "slices"), [(2.0, 45), (5.0, 20)])
def test_bones_and_canal_from_2_to_5_mm_slices(thickness, slices):
    # The thin-cortex, low-density patient: ribs blend most with soft tissue at 5 mm.
    p = make_phantom(slices=slices, slice_thickness=thickness, variant="slim")
    r = run(p, ("Bones", "SpinalCanal"))
    assert dice(r["Bones"].mask, p.truth["Bones"]) >= 0.90
    assert dice(r["SpinalCanal"].mask, p.truth["SpinalCanal"]) >= 0.90
