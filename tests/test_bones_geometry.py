"""The skeleton's geometry on series whose bone box does not start at the first slice."""

from __future__ import annotations

import numpy as np

from oncoseg_node.commissioning.phantom import make_phantom
from oncoseg_node.contouring.engines.classical.labels import LabelStats
from oncoseg_node.contouring.engines.classical.vessels import round_tubes as _round_tubes


def _tube(shape: tuple[int, int, int], z0: int, z1: int, centre: tuple[int, int],
          radius: int) -> np.ndarray:
    """A round cylinder on slices ``z0..z1 - 1`` of a box of ``shape``."""
    yy, xx = np.mgrid[:shape[1], :shape[2]]
    disk = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2
    out = np.zeros(shape, dtype=bool)
    out[z0:z1] = disk
    return out


def test_a_tube_is_measured_on_its_own_slices_when_the_box_starts_late():
    # 10 slices 5 mm apart, then 40 slices 1 mm apart: the bone box is the 1 mm part.
    offsets = np.concatenate([np.arange(10) * 5.0, 50.0 + np.arange(40)])
    volume = make_phantom(slices=len(offsets), rows=64, columns=64, pixel_spacing=(1.0, 1.0),
                          slice_offsets=offsets).volume
    box = (slice(10, 50), slice(0, 64), slice(0, 64))
    shape = (40, 64, 64)
    labels = np.zeros(shape, dtype=np.int32)
    labels[_tube(shape, 0, 25, (16, 16), 6)] = 1   # 24 mm along the table: a vertebra's length
    labels[_tube(shape, 0, 36, (46, 46), 6)] = 2   # 35 mm: longer than any vertebra
    core = LabelStats(labels, 2)
    found = _round_tubes(volume, box, core, np.array([1, 2]))
    # Counted from the volume's first slice, tube 1 would span 45 mm + 15 mm.
    assert found.tolist() == [False, True]
