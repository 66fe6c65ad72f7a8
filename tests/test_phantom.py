from __future__ import annotations

import numpy as np
import pytest

from oncoseg_node.phantom import make_phantom, write_phantom
from tests.peers import dciodvfy


def test_written_phantom_passes_dciodvfy(tmp_path):
    write_phantom(tmp_path, slices=4, rows=128, columns=128, pixel_spacing=(3.9, 3.9))
    for path in sorted(tmp_path.iterdir()):
        errors, output = dciodvfy(path)
        assert errors == [], output


@pytest.mark.parametrize("position", ["HFS", "HFP", "FFS", "FFP"])
def test_left_lung_truth_lies_at_positive_patient_x(position):
    p = make_phantom(slices=8, rows=96, columns=96, pixel_spacing=(4.0, 4.0),
                     patient_position=position)
    z, ys, xs = np.nonzero(p.truth["Lung_L"])
    k = int(np.median(z))
    sel = z == k
    assert p.volume.index_to_patient(k, ys[sel], xs[sel])[:, 0].mean() > 40


def test_slices_are_sorted_along_the_normal_and_truth_matches_shape():
    p = make_phantom(slices=6, rows=64, columns=64, pixel_spacing=(6.0, 6.0),
                     slice_offsets=[0, 2, 4, 9, 14, 19])
    assert np.all(np.diff(p.volume.slice_offsets) > 0)
    assert np.allclose(np.diff(p.volume.slice_offsets), [2, 2, 5, 5, 5])
    for mask in p.truth.values():
        assert mask.shape == p.volume.shape


def test_head_phantom_has_no_lungs():
    p = make_phantom(slices=6, rows=64, columns=64, pixel_spacing=(4.0, 4.0), site="head")
    assert "Lung_L" not in p.truth and p.truth["External"].any()
