"""Directly encoded elements and items read back by pydicom, and walked back by us."""

from __future__ import annotations

import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset

from oncoseg_node.rtstruct import encode as le


def test_pydicom_reads_what_we_encode_and_we_walk_it_back():
    inner = le.item(le.element(0x00081150, "UI", b"1.2.840.10008.5.1.4.1.1.2")
                    + le.element(0x00081155, "UI", b"1.2.3.4"))
    encoded = (le.element(0x30060016, "SQ", inner)
               + le.element(0x30060042, "CS", b"CLOSED_PLANAR")
               + le.element(0x30060050, "DS", b"1.5\\-2.25\\3"))
    ds = read_dataset(DicomBytesIO(encoded), is_implicit_VR=False, is_little_endian=True)
    assert ds.ContourImageSequence[0].ReferencedSOPInstanceUID == "1.2.3.4"
    assert ds.ContourGeometricType == "CLOSED_PLANAR"  # odd length padded with a space
    assert [float(v) for v in ds.ContourData] == [1.5, -2.25, 3.0]

    found = le.elements(encoded)
    assert list(found) == [0x30060016, 0x30060042, 0x30060050]
    (content,) = le.items(found[0x30060016][1])
    assert bytes(le.elements(content)[0x00081155][1]) == b"1.2.3.4\0"


def test_a_value_too_long_for_its_vr_is_an_error_not_a_silent_change():
    with pytest.raises(le.EncodingError, match="65535"):
        le.element(0x30060050, "DS", b"1" * 70_000)
    assert len(le.element(0x30060040, "SQ", b"\0" * 70_000)) == 12 + 70_000


def test_bytes_that_are_not_items_of_defined_length_are_refused():
    undefined = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    with pytest.raises(le.EncodingError, match="defined length"):
        list(le.items(undefined))
    with pytest.raises(le.EncodingError, match="runs past"):
        list(le.items(le.item(b"\0" * 8)[:-2]))
    with pytest.raises(le.EncodingError, match="does not fit"):
        le.elements(le.element(0x00100010, "PN", b"DOE^JOHN")[:-2])


def test_ds_groups_read_like_python_formatting_of_the_rounded_millimetres():
    import numpy as np

    from oncoseg_node.errors import RTStructError
    from oncoseg_node.rtstruct.contour_items import encode_ds_groups

    rng = np.random.default_rng(7)
    values = np.concatenate([
        rng.uniform(-1, 1, 4000) * 10.0 ** rng.integers(-4, 7, 4000),
        [0.0, -0.0, -0.0004, 0.0005, -0.0006, 9.9995, 999999.999, -999999.999, 1e-9]])
    counts = [3, 1, 2000, len(values) - 2004]
    milli = np.round(values * 1000.0).astype(np.int64)
    expected = [("-" if m < 0 else "") + f"{abs(m) // 1000}.{abs(m) % 1000:03d}" for m in milli]
    groups = encode_ds_groups(values, counts)
    assert [len(g.split(b"\\")) for g in groups] == counts
    assert b"\\".join(groups).decode().split("\\") == expected
    assert max(len(v) for v in expected) <= 16  # DS values hold at most 16 characters
    with pytest.raises(RTStructError, match="999999 mm"):
        encode_ds_groups(np.array([1e6]), [1])
