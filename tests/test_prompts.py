from __future__ import annotations

import numpy as np
import pytest

from oncoseg_node.engines.prompts import box_prompts
from oncoseg_node.phantom import make_phantom
from oncoseg_node.protocols import Structure


@pytest.mark.parametrize("position", ["HFS", "FFP"])
def test_lung_boxes_enclose_the_lung_on_the_right_side(position):
    p = make_phantom(slices=16, rows=128, columns=128, pixel_spacing=(3.9, 3.9),
                     patient_position=position)
    lung = Structure("Lung_L", (0, 0, 0), laterality="left", hu_window=(-950.0, -500.0))
    boxes = box_prompts(p.volume, lung)
    truth = p.truth["Lung_L"]
    other = p.truth["Lung_R"]
    assert set(boxes) == set(np.flatnonzero(truth.any(axis=(1, 2))).tolist())
    for z, ((r0, c0, r1, c1),) in boxes.items():
        ys, xs = np.nonzero(truth[z])
        assert r0 <= ys.min() and c0 <= xs.min() and r1 >= ys.max() and c1 >= xs.max()
        oy, ox = np.nonzero(other[z])
        assert not (r0 <= oy.mean() <= r1 and c0 <= ox.mean() <= c1)  # right lung excluded


def test_structure_without_window_has_no_boxes():
    p = make_phantom(slices=4, rows=64, columns=64, pixel_spacing=(6.0, 6.0))
    assert box_prompts(p.volume, Structure("Heart", (0, 0, 0))) is None
