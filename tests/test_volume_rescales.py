"""Stored values to int16 HU for rescales and encodings scanners and routers really send.

Each case is compared with the HU computed in float64 from the stored values
(rounded, clipped to int16): BitsStored 12 with other bits set above it,
signed 12-bit, values beyond int16 after rescale, RescaleSlope absent,
fractional slopes and intercepts, and signed and unsigned series compressed
by DCMTK (JPEG lossless, JPEG-LS) and pylibjpeg (JPEG 2000) before loading.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from oncoseg_node.contouring.volume import read_ct_slices, volume_from_datasets, volume_from_files
from oncoseg_node.errors import SeriesLoadError
from tests.ctfactory import encode, series
from tests.peers import DCMTK_ENV, require

SIZE = 16


def instance(stored: np.ndarray, *, slope: float | None, intercept: float, signed: bool,
             bits: int = 16):
    ds = series(1, size=stored.shape[0])[0]
    ds.PixelRepresentation = int(signed)
    ds.BitsStored, ds.HighBit = bits, bits - 1
    if slope is None:
        del ds.RescaleSlope
    else:
        ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.PixelData = stored.astype(np.int16 if signed else np.uint16).tobytes()
    return ds


def expected_hu(values: np.ndarray, slope: float, intercept: float) -> tuple[np.ndarray, int]:
    hu = np.rint(values.astype(np.float64) * slope + intercept)
    return np.clip(hu, -32768, 32767).astype(np.int16), int(((hu < -32768) | (hu > 32767)).sum())


def test_bits_above_bits_stored_are_ignored():
    values = np.arange(SIZE * SIZE, dtype=np.uint16).reshape(SIZE, SIZE) * 16 % 4096
    stored = values | 0xF000  # a scanner's overlay or garbage in the unused high bits
    vol = volume_from_datasets([instance(stored, slope=1, intercept=-1024, signed=False,
                                         bits=12)])
    assert np.array_equal(vol.hu[0], values.astype(np.int16) - 1024)


def test_signed_twelve_bit_values_are_sign_extended():
    values = np.linspace(-2048, 2047, SIZE * SIZE).round().astype(np.int16).reshape(SIZE, SIZE)
    for stored in (values, (values.view(np.uint16) & 0x0FFF).view(np.int16)):
        vol = volume_from_datasets([instance(stored, slope=1, intercept=0, signed=True,
                                             bits=12)])
        assert np.array_equal(vol.hu[0], values)


@pytest.mark.parametrize("slope, intercept, signed, lo, hi", [
    (1, 0, False, 60000, 65535),      # extended CT scale: beyond int16, clipped and counted
    (None, -1024, False, 0, 4095),    # RescaleSlope absent: 1
    (0.5, -1024.5, False, 0, 4095),
    (2.0, -1024, False, 0, 40000),
    (1, -1024, True, -32768, 32767),  # below int16 after the intercept
])
def test_rescales_match_float_hu(slope, intercept, signed, lo, hi):
    stored = np.linspace(lo, hi, SIZE * SIZE).round().reshape(SIZE, SIZE)
    vol = volume_from_datasets([instance(stored, slope=slope, intercept=intercept,
                                         signed=signed)])
    hu, clipped = expected_hu(stored, 1.0 if slope is None else slope, intercept)
    assert np.array_equal(vol.hu[0], hu)
    assert vol.hu_clipped == clipped


@pytest.mark.parametrize("slope", [0, float("inf"), float("nan")])
def test_a_rescale_that_gives_no_hu_is_refused_by_name(slope):
    """A file read offline never passed the receiver's checks: the load refuses it."""
    ds = instance(np.zeros((SIZE, SIZE)), slope=1, intercept=-1024, signed=False)
    ds.RescaleSlope = slope
    with pytest.raises(SeriesLoadError, match="RescaleSlope"):
        volume_from_datasets([ds])


def compressed(source: Path, target: Path, how: str) -> None:
    if how == "j2k":
        ds = pydicom.dcmread(source)
        ds.compress("1.2.840.10008.1.2.4.90", encoding_plugin="pylibjpeg",
                    generate_instance_uid=False)
        ds.save_as(target, enforce_file_format=True)
        return
    command = {"jpeg-lossless": ["dcmcjpeg", "+e1"], "jpeg-ls": ["dcmcjpls", "+el"],
               "rle": ["dcmcrle"]}[how]
    subprocess.run([require(command[0]), *command[1:], str(source), str(target)],
                   env=DCMTK_ENV, check=True, capture_output=True, timeout=60)


@pytest.mark.peers
@pytest.mark.parametrize("how", ["jpeg-lossless", "jpeg-ls", "rle", "j2k"])
@pytest.mark.parametrize("signed, bits, lo, hi, intercept", [
    (True, 16, -2000, 3000, 0), (True, 12, -2048, 2047, 0),
    (False, 16, 0, 65535, -1024), (False, 12, 0, 4095, -1024),
])
def test_compressed_series_decode_to_the_same_hu(tmp_path, how, signed, bits, lo, hi,
                                                 intercept):
    stored = np.random.default_rng(1).integers(lo, hi + 1, (64, 64))
    plain = tmp_path / "plain.dcm"
    plain.write_bytes(encode(instance(stored, slope=1, intercept=intercept, signed=signed,
                                      bits=bits)))
    target = tmp_path / "compressed.dcm"
    compressed(plain, target, how)
    vol = volume_from_files(read_ct_slices([target], pixels=False))
    hu, clipped = expected_hu(stored, 1.0, intercept)
    assert np.array_equal(vol.hu[0], hu)
    assert vol.hu_clipped == clipped
