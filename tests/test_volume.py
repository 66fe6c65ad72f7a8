"""Stored pixel values to HU: int16, exact for CT, rounded and clipped with a count otherwise.

The series are tiny hand-made instances so each rescale case is exact; the
last test runs ``oncoseg-node segment`` as a subprocess on a phantom whose
rescale overflows int16 and checks the operator is told.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from oncoseg_node.commissioning.phantom import write_phantom
from oncoseg_node.contouring.volume import HU_MAX, HU_MIN, volume_from_datasets
from tests.conftest import write_config
from tests.ctfactory import series

SIZE = 16


def with_pixels(datasets, stored: list[np.ndarray], slope: float, intercept: float,
                signed: bool = False):
    for ds, values in zip(datasets, stored, strict=True):
        ds.PixelRepresentation = int(signed)
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.PixelData = values.astype(np.int16 if signed else np.uint16).tobytes()
    return datasets


def ramp(n: int, lo: int, hi: int) -> list[np.ndarray]:
    values = np.linspace(lo, hi, n * SIZE * SIZE).round().astype(np.int64)
    return list(values.reshape(n, SIZE, SIZE))


def test_ct_rescale_gives_exact_int16_hu():
    stored = ramp(3, 0, 4095)
    volume = volume_from_datasets(with_pixels(series(3, size=SIZE), stored, 1, -1024))
    assert volume.hu.dtype == np.int16
    assert np.array_equal(volume.hu, np.stack(stored) - 1024)
    assert volume.hu_clipped == 0 and volume.hu_note == ""


def test_signed_stored_values_and_the_edges_of_int16():
    stored = [np.full((SIZE, SIZE), v) for v in (-32768 + 1024, 0, 32767)]
    volume = volume_from_datasets(with_pixels(series(3, size=SIZE), stored, 1, -1024,
                                              signed=True))
    assert volume.hu[:, 0, 0].tolist() == [-32768, -1024, 32767 - 1024]
    assert volume.hu_clipped == 0


def test_fractional_rescale_rounds_to_the_nearest_hu():
    stored = ramp(2, 0, 4095)
    volume = volume_from_datasets(with_pixels(series(2, size=SIZE), stored, 0.7, -1024.3))
    expected = np.rint(np.stack(stored) * 0.7 - 1024.3)
    assert np.array_equal(volume.hu, expected.astype(np.int16))
    assert volume.hu_clipped == 0


@pytest.mark.parametrize(("slope", "intercept", "signed"), [
    (1, 0, False),          # unsigned 16-bit stored beyond 32767 with no offset
    (16, -1024, False),     # a slope that overflows
    (1, -1024, True),       # signed stored at its minimum, shifted below int16
])
def test_hu_outside_int16_are_clipped_and_counted(slope, intercept, signed):
    stored = [np.zeros((SIZE, SIZE), np.int64) for _ in range(2)]
    stored[1][:3, :] = -32768 if signed else 65535
    volume = volume_from_datasets(with_pixels(series(2, size=SIZE), stored, slope, intercept,
                                              signed))
    assert volume.hu_clipped == 3 * SIZE
    assert volume.hu[1, 0, 0] == (HU_MIN if signed else HU_MAX)
    assert volume.hu[0, 0, 0] == intercept  # the rest is untouched
    assert f"{3 * SIZE} voxels" in volume.hu_note


def test_segment_says_when_hu_were_clipped(tmp_path: Path):
    folder = tmp_path / "ct"
    write_phantom(folder, slices=6, rows=64, columns=64, pixel_spacing=(6.0, 6.0))
    first = sorted(folder.iterdir())[0]
    ds = pydicom.dcmread(first)
    ds.RescaleSlope = 64  # all but air now beyond int16's range
    ds.save_as(first, enforce_file_format=True)
    proc = subprocess.run(
        [sys.executable, "-m", "oncoseg_node.cli", "segment", str(folder), "-o",
         str(tmp_path / "out"), "--config", str(write_config(tmp_path))],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "warning: " in proc.stdout and "were clipped to that range" in proc.stdout
