from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from oncoseg_node.commissioning.phantom import VARIANTS, make_phantom, write_phantom
from oncoseg_node.contouring.geometry import check_series
from oncoseg_node.errors import GeometryError
from tests.peers import dciodvfy

SMALL = {"slices": 24, "rows": 128, "columns": 128, "pixel_spacing": (3.9, 3.9)}
FINE = {"slices": 16, "rows": 256, "columns": 256, "pixel_spacing": (1.95, 1.95)}
POSITIONS = ["HFS", "HFP", "FFS", "FFP"]


def patient_points(volume, mask: np.ndarray) -> np.ndarray:
    """LPS coordinates (n, 3) of a mask's voxel centres, each slice with its own geometry."""
    points = [volume.index_to_patient(int(z), *np.nonzero(mask[z]))
              for z in np.flatnonzero(mask.any(axis=(1, 2)))]
    return np.concatenate(points)


@pytest.mark.peers
@pytest.mark.parametrize("kwargs", [
    {"slices": 3},
    {"slices": 3, "patient_position": "FFP", "gantry_tilt_deg": 12.0, "site": "pelvis"},
    {"slices": 3, "patient_position": "HFP", "site": "head", "pixel_spacing": (3.0, 4.2)},
])
def test_written_phantom_passes_dciodvfy(tmp_path, kwargs):
    write_phantom(tmp_path, rows=128, columns=128, **{"pixel_spacing": (3.9, 3.9), **kwargs})
    paths = sorted(tmp_path.iterdir())
    assert [p.name for p in paths] == ["CT000001.dcm", "CT000002.dcm", "CT000003.dcm"]
    for path in paths:
        errors, output = dciodvfy(path)
        assert errors == [], output


@pytest.mark.parametrize("position", POSITIONS)
def test_truth_is_the_analytic_anatomy_in_patient_coordinates(position):
    """Independent of the grid: the canal's voxels lie in its ellipse, the left lung at +x."""
    p = make_phantom(**SMALL, patient_position=position)
    canal = patient_points(p.volume, p.truth["SpinalCanal"])
    assert np.all((canal[:, 0] / 8.0) ** 2 + ((canal[:, 1] - 84.0) / 7.0) ** 2 <= 1.0 + 1e-9)
    left = patient_points(p.volume, p.truth["Lung_L"])
    right = patient_points(p.volume, p.truth["Lung_R"])
    assert left[:, 0].min() > 0 > right[:, 0].max()
    # The spine is posterior (+y) whichever way the patient lies.
    assert canal[:, 1].mean() > left[:, 1].mean()


def test_anatomy_does_not_depend_on_the_patient_position():
    volumes = {pos: make_phantom(**SMALL, patient_position=pos) for pos in POSITIONS}
    for name in ("Lung_L", "Lung_R", "Bones", "External"):
        cc = [v.volume.mask_volume_cc(v.truth[name]) for v in volumes.values()]
        assert max(cc) / min(cc) < 1.01, (name, cc)


@pytest.mark.parametrize("position", POSITIONS)
def test_couch_lies_against_the_body_on_the_side_it_lies_on(position):
    p = make_phantom(**FINE, patient_position=position, variant="slim")  # no mattress
    body = p.truth["External"]
    dense_outside = (p.volume.hu > -350) & ~body
    couch = patient_points(p.volume, dense_outside)
    # Posterior when supine, anterior when prone: the couch is what gravity points at.
    assert np.sign(np.median(couch[:, 1])) == (1 if position.endswith("S") else -1)
    touching = ndimage.binary_dilation(body, structure=np.ones((1, 3, 3))) & dense_outside
    assert touching.sum() > 20


@pytest.mark.parametrize("variant", ["standard", "large"])
def test_the_patient_lies_on_a_foam_mattress_on_a_curved_couch(variant):
    p = make_phantom(**FINE, variant=variant)
    body, hu = p.truth["External"], p.volume.hu
    below = ndimage.binary_dilation(body, structure=np.ones((1, 5, 5))) & ~body
    foam = below & (hu > -900) & (hu < -700)
    assert foam.sum() > 200  # the body rests on foam, not on the couch shell
    assert not (below & (hu > -350)).sum() > 0.02 * below.sum()
    # The couch top is curved: its shell is nearer the patient (HFS: above) at the sides.
    shell = (hu > -500) & ~ndimage.binary_dilation(body, np.ones((1, 5, 5), bool))
    rows = [np.flatnonzero(shell[:, :, c].any(axis=0)) for c in (128, 60)]
    rows = [r[r > 128] for r in rows]
    assert rows[0].size and rows[1].size and rows[1].min() < rows[0].min()


def test_variants_change_the_patient_not_the_rules():
    base = make_phantom(**SMALL)
    for name, variant in VARIANTS.items():
        p = make_phantom(**SMALL, variant=name)
        assert np.array_equal(p.volume.hu, make_phantom(**SMALL, variant=variant).volume.hu)
        if name != "standard":
            assert not np.array_equal(p.volume.hu, base.volume.hu)
    assert set(VARIANTS) >= {"standard", "slim", "large"}


@pytest.mark.parametrize("variant", ["standard", "slim", "large"])
def test_bones_are_cortex_around_textured_marrow(variant):
    p = make_phantom(slices=30, variant=variant)
    hu, bones = p.volume.hu, p.truth["Bones"]
    v = VARIANTS[variant]
    inside = ndimage.binary_erosion(bones, np.ones((1, 5, 5), bool)) & (hu < 400)
    marrow = hu[inside]
    assert 100 <= np.median(marrow) <= 300 and abs(np.median(marrow) - v.marrow_hu) < 40
    assert marrow.std() > v.noise_sd  # trabecular texture on top of the noise
    assert np.percentile(hu[bones], 95) > 1.5 * v.marrow_hu  # the cortex


def test_vertebral_ring_is_closed_only_at_the_pedicles_and_discs_sit_between():
    p = make_phantom(slices=60, rows=256, columns=256, pixel_spacing=(1.95, 1.95),
                     slice_thickness=1.0)
    canal = p.truth["SpinalCanal"]
    ring = ndimage.binary_dilation(canal, np.ones((1, 9, 9), bool)) & ~canal
    closed = []
    for z in range(canal.shape[0]):
        around = p.truth["Bones"][z] & ring[z]
        filled = ndimage.binary_fill_holes(around)
        closed.append(bool((filled & canal[z]).sum() >= 0.9 * canal[z].sum()))
    assert 0.15 < np.mean(closed) < 0.6  # at the pedicles only
    spine = p.truth["Bones"] | canal
    discs = [z for z in range(canal.shape[0])
             if not (p.truth["Bones"][z] & ndimage.binary_dilation(canal[z], iterations=12)).any()]
    assert discs, "no slice at a disc"
    assert spine.any()


def test_ribs_at_3_mm_are_blended_with_soft_tissue():
    p = make_phantom(slices=30)
    hu, bones = p.volume.hu, p.truth["Bones"]
    # Partial volume: voxels outside the truth that carry some bone, inside that carry little.
    shell = ndimage.binary_dilation(bones, np.ones((3, 1, 1), bool)) & ~bones
    blended = shell & (hu > 150) & (hu < 400)
    assert blended.sum() > 500


def test_contrast_metal_and_arms_are_in_the_series():
    p = make_phantom(**FINE)
    hu = p.volume.hu
    assert np.median(hu[p.truth["A_Aorta"]]) > 250
    assert (hu > 2500).sum() > 10  # the port
    assert not (p.truth["Bones"] & (hu > 2500)).any()
    body = p.truth["External"]
    x = patient_points(p.volume, body)[:, 0]
    assert x.max() > 200 and x.min() < -200  # arms beside the trunk
    pelvis = make_phantom(**FINE, site="pelvis")
    assert (pelvis.volume.hu > 2500).sum() > 100  # the hip prosthesis


def test_thorax_has_air_filled_airways_outside_the_lungs_and_textured_lung():
    p = make_phantom(**FINE)
    hu, t = p.volume.hu, p.truth
    airways = t["Trachea"] | t["Bronchus"]
    assert not (airways & t["Lungs"]).any()
    assert np.median(hu[ndimage.binary_erosion(t["Trachea"], iterations=2)]) < -900
    lung = hu[t["Lungs"] & (hu < -400)]
    assert -880 < np.median(lung) < -800 and lung.std() > 15
    # Vessels: soft tissue inside the lung truth.
    assert (t["Lungs"] & (hu > -300)).sum() > 50
    assert t["Lungs"].sum() == (t["Lung_L"] | t["Lung_R"]).sum()
    assert np.all(t["Lungs"] <= t["External"])


@pytest.mark.parametrize("site", ["head", "pelvis"])
def test_head_and_pelvis_have_no_lungs(site):
    p = make_phantom(**SMALL, site=site)
    assert not {"Lung_L", "Lung_R", "Lungs"} & set(p.truth)
    assert p.truth["External"].any() and p.truth["Bones"].any()


def test_pelvis_has_bowel_gas_as_large_as_a_small_lung():
    p = make_phantom(**SMALL, site="pelvis")
    gas = (p.volume.hu < -900) & p.truth["External"]
    assert p.volume.mask_volume_cc(gas) > 30


def test_slices_are_sorted_along_the_normal_and_truth_matches_shape():
    p = make_phantom(slices=6, rows=64, columns=64, pixel_spacing=(6.0, 6.0),
                     slice_offsets=[9, 0, 2, 4, 14, 19])
    assert np.allclose(np.diff(p.volume.slice_offsets), [2, 2, 5, 5, 5])
    assert [int(ds.InstanceNumber) for ds in p.datasets] == [1, 2, 3, 4, 5, 6]
    for mask in p.truth.values():
        assert mask.shape == p.volume.shape and mask.dtype == bool
    check_series(p.datasets)  # non-uniform spacing is allowed


def test_gantry_tilt_tilts_the_plane_and_the_geometry_gate_refuses_it():
    p = make_phantom(slices=6, rows=64, columns=64, pixel_spacing=(6.0, 6.0),
                     gantry_tilt_deg=15.0)
    iop = [float(v) for v in p.datasets[0].ImageOrientationPatient]
    assert iop[:3] == [1, 0, 0] and iop[5] == pytest.approx(np.sin(np.radians(15.0)))
    with pytest.raises(GeometryError, match="gantry tilt"):
        check_series(p.datasets)
    check_series(make_phantom(slices=6, rows=64, columns=64, pixel_spacing=(6.0, 6.0)).datasets)


def test_same_arguments_give_the_same_series_and_another_seed_another():
    a = make_phantom(slices=4, rows=64, columns=64, pixel_spacing=(6.0, 6.0))
    b = make_phantom(slices=4, rows=64, columns=64, pixel_spacing=(6.0, 6.0))
    c = make_phantom(slices=4, rows=64, columns=64, pixel_spacing=(6.0, 6.0), seed=1)
    assert a.volume.series_instance_uid == b.volume.series_instance_uid
    assert a.volume.sop_instance_uids == b.volume.sop_instance_uids
    assert np.array_equal(a.volume.hu, b.volume.hu)
    assert c.volume.series_instance_uid != a.volume.series_instance_uid
    assert len(set(a.volume.sop_instance_uids)) == 4
    assert not np.array_equal(a.volume.hu, c.volume.hu)


def test_pixel_data_is_hounsfield_through_the_rescale():
    p = make_phantom(slices=2, rows=64, columns=64, pixel_spacing=(6.0, 6.0))
    ds = p.datasets[0]
    rescale = (float(ds.RescaleIntercept), float(ds.RescaleSlope))
    assert rescale == (-1024.0, 1.0) and ds.PixelRepresentation == 0
    corner = p.volume.hu[0, :3, :3]
    assert np.all(np.abs(corner + 1000) < 80)  # air outside, with noise
