from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from oncoseg_node.commissioning.phantom import make_phantom
from oncoseg_node.contouring.engines.sam3.prompts import (
    IntensityBoxPrompter,
    PixelBox,
    PromptSpec,
    box_prompts,
    boxes_from_mask,
    intensity_boxes,
)
from oncoseg_node.contouring.protocols import Structure

MEDIUM = {"slices": 40, "rows": 256, "columns": 256, "pixel_spacing": (1.95, 1.95)}


def structure(name: str, **kwargs) -> Structure:
    return Structure(name, (0, 0, 0), **kwargs)


def truth_box(mask2d: np.ndarray) -> PixelBox:
    rows, cols = np.nonzero(mask2d)
    return PixelBox(rows.min(), cols.min(), rows.max(), cols.max())


def centre_x(volume, z: int, box: PixelBox) -> float:
    """Patient x (LPS, + = left) of a box's centre on slice z."""
    point = volume.index_to_patient(z, np.array([(box.row0 + box.row1) / 2]),
                                    np.array([(box.col0 + box.col1) / 2]))
    return float(point[0, 0])


@pytest.fixture(scope="module", params=["HFS", "HFP", "FFS", "FFP"])
def thorax(request):
    return make_phantom(**MEDIUM, patient_position=request.param)


@pytest.mark.parametrize(("name", "sign"), [("Lung_L", 1), ("Lung_R", -1)])
def test_lung_boxes_hold_the_lung_on_the_patients_side(thorax, name, sign):
    volume, truth = thorax.volume, thorax.truth[name]
    boxes = intensity_boxes(volume, structure(name))
    margin = round(5.0 / 1.95)
    big = [z for z in range(volume.shape[0]) if truth[z].sum() * 1.95 ** 2 >= 300]
    assert big and set(big) <= set(boxes)
    for z, found in boxes.items():
        assert len(found) == 1
        box = found[0]
        assert sign * centre_x(volume, z, box) > 20.0
        if z in big:
            # The recipe opens the window by 2 mm (one pixel here): a sliver of lung
            # thinner than that (around a bronchus) is not what the box is drawn on.
            opened = ndimage.binary_opening(truth[z], np.ones((3, 3), bool))
            tight = truth_box(opened)
            # Holds the lung, and is no more than the margin (and a pixel) bigger.
            assert box.row0 <= tight.row0 and box.col0 <= tight.col0
            assert box.row1 >= tight.row1 and box.col1 >= tight.col1
            assert tight.row0 - box.row0 <= margin + 1 and box.row1 - tight.row1 <= margin + 1
            assert tight.col0 - box.col0 <= margin + 1 and box.col1 - tight.col1 <= margin + 1


def test_paired_lungs_give_two_boxes_per_slice(thorax):
    boxes = intensity_boxes(thorax.volume, structure("Lungs"))
    both = thorax.truth["Lung_L"].any(axis=(1, 2)) & thorax.truth["Lung_R"].any(axis=(1, 2))
    middle = int(np.flatnonzero(both).mean())
    assert len(boxes[middle]) == 2
    xs = sorted(centre_x(thorax.volume, middle, b) for b in boxes[middle])
    assert xs[0] < -20 < 20 < xs[1]


def test_no_lung_boxes_without_lungs():
    pelvis = make_phantom(**MEDIUM, site="pelvis")  # bowel gas, but no lung
    prompter = IntensityBoxPrompter(defaults=True)
    assert prompter(pelvis.volume, structure("Lung_L")) is None
    assert intensity_boxes(pelvis.volume, structure("Lungs")) == {}


def test_protocol_window_and_name_side_select_the_left_ilium():
    pelvis = make_phantom(**MEDIUM, site="pelvis", patient_position="FFS")
    ilium = structure("Bone_Ilium_L", hu_window=(200.0, 3000.0))
    boxes = IntensityBoxPrompter()(pelvis.volume, ilium)
    # The phantom's iliac wings: rings 60 mm wide at x = +-95 mm, cranial half only.
    cranial = [z for z in range(pelvis.volume.shape[0])
               if pelvis.volume.index_to_patient(z, np.array([0]), np.array([0]))[0, 2] > 0]
    assert boxes and set(boxes) == set(cranial)
    for z, found in boxes.items():
        (box,) = found
        assert abs(centre_x(pelvis.volume, z, box) - 95.0) < 6.0
        width = (box.col1 - box.col0 + 1) * 1.95
        assert 60.0 <= width <= 60.0 + 2 * round(5.0 / 1.95) * 1.95 + 4 * 1.95


def test_structures_without_a_recipe_get_text_only():
    p = make_phantom(slices=4, rows=64, columns=64, pixel_spacing=(6.0, 6.0))
    assert IntensityBoxPrompter(defaults=True)(p.volume, structure("Heart")) is None


def test_the_engines_prompter_boxes_only_what_the_protocol_windows():
    p = make_phantom(slices=16, rows=128, columns=128, pixel_spacing=(3.9, 3.9),
                     patient_position="FFP")
    assert box_prompts(p.volume, structure("Lung_L")) is None
    windowed = structure("Lung_L", laterality="left", hu_window=(-950.0, -500.0))
    boxes = box_prompts(p.volume, windowed)
    assert boxes and set(boxes) <= set(np.flatnonzero(p.truth["Lung_L"].any(axis=(1, 2))))
    for z, (box,) in boxes.items():
        assert centre_x(p.volume, z, box) > 20.0


def test_boxes_from_mask_is_inclusive_clipped_and_skips_slivers():
    p = make_phantom(slices=2, rows=64, columns=64, pixel_spacing=(2.0, 2.0))
    mask = np.zeros(p.volume.shape, dtype=bool)
    mask[0, 10:20, 30:35] = True   # 10 x 5 pixels = 200 mm^2
    mask[0, 10:20, 40:42] = True   # an island of the same object (joined on slice 1)
    mask[1, 15, 30:42] = True
    mask[0, 60:64, 0:3] = True     # at the corner: the margin is clipped
    mask[1, 5, 5] = True           # 4 mm^2 sliver
    boxes = boxes_from_mask(p.volume, mask, margin_mm=4.0, min_area_mm2=10.0)
    assert sorted(boxes) == [0, 1]
    assert sorted(boxes[0]) == [PixelBox(8, 28, 21, 43), PixelBox(58, 0, 63, 4)]
    assert boxes[1] == [PixelBox(13, 28, 17, 43)]
    assert PixelBox(8, 28, 21, 36).xyxy == (28, 8, 36, 21)


def test_spec_margin_zero_gives_the_tight_box():
    p = make_phantom(**MEDIUM)
    spec = PromptSpec((-960.0, -400.0), margin_mm=0.0, min_cc=30.0)
    boxes = intensity_boxes(p.volume, structure("Lung_L"), spec)
    z = p.volume.shape[0] // 2
    tight = truth_box(p.truth["Lung_L"][z])
    (box,) = boxes[z]
    assert max(abs(a - b) for a, b in zip(box, tight, strict=True)) <= 1


def test_smoothing_is_an_in_plane_mean():
    from scipy import ndimage

    from oncoseg_node.contouring.engines.sam3.prompts import _box_mean

    hu = np.random.default_rng(3).normal(0, 100, (3, 30, 40)).astype(np.float32)
    ours = _box_mean(hu, 2, 1)
    expected = ndimage.uniform_filter(hu.astype(np.float64), size=(1, 5, 3))
    assert np.allclose(ours[:, 2:-2, 1:-1], expected[:, 2:-2, 1:-1], atol=1e-3)
    assert np.array_equal(ours[:, 0, 0], hu[:, 0, 0])  # edges are left as they are
