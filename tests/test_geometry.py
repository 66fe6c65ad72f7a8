from __future__ import annotations

import pytest

from oncoseg_node.contouring.geometry import check_series
from oncoseg_node.errors import GeometryError
from tests.ctfactory import ct_slice, series


def test_regular_series_passes_in_any_arrival_order():
    datasets = series(10)
    report = check_series(list(reversed(datasets)))
    assert report.slices == 10 and report.uniform
    assert report.spacing_min_mm == pytest.approx(2.5)


def test_missing_slice_is_refused():
    datasets = series(10)
    del datasets[5]
    with pytest.raises(GeometryError, match="missing slice"):
        check_series(datasets)


def test_deliberate_spacing_change_is_allowed():
    ds = series(12)
    z = [0, 2, 4, 6, 8, 10, 15, 20, 25, 30, 35, 40]
    for d, zz in zip(ds, z, strict=True):
        d.ImagePositionPatient = [-20.0, -20.0, float(zz)]
    report = check_series(ds)
    assert not report.uniform and report.spacing_max_mm == pytest.approx(5)


def test_gantry_tilt_is_refused():
    ds = series(6)
    for i, d in enumerate(ds):  # positions shifted in y as z advances: sheared stack
        d.ImagePositionPatient = [-20.0, -20.0 + i * 2.5 * 0.2, i * 2.5]
    with pytest.raises(GeometryError, match="gantry tilt"):
        check_series(ds)


@pytest.mark.parametrize(
    ("keyword", "value", "message"),
    [
        ("FrameOfReferenceUID", "1.2.3.4", "mixed FrameOfReferenceUID"),
        ("PixelSpacing", [1.0, 1.0], "mixed PixelSpacing"),
        ("ImageOrientationPatient", [0, 1, 0, 1, 0, 0], "mixed ImageOrientationPatient"),
        ("Rows", 32, "mixed Rows"),
    ],
)
def test_mixed_geometry_is_refused(keyword, value, message):
    ds = series(5)
    setattr(ds[3], keyword, value)
    with pytest.raises(GeometryError, match=message):
        check_series(ds)


def test_duplicate_position_is_refused():
    ds = series(4)
    extra = ct_slice(series_uid=ds[0].SeriesInstanceUID, study_uid=ds[0].StudyInstanceUID,
                     frame_uid=ds[0].FrameOfReferenceUID, index=2)
    with pytest.raises(GeometryError, match="share one position"):
        check_series([*ds, extra])
