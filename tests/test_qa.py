"""QA snapshot: PNG encoding, the three planes, radiological orientation, true proportions."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset

from oncoseg_node.contouring.volume import Volume
from oncoseg_node.ops.qa import (
    BACKGROUND,
    CROP_MARGIN_MM,
    GAP_PX,
    LABEL_PX,
    LETTER_COLOR,
    Overlay,
    encode_png,
    qa_relpath,
    render_qa,
    render_views,
    write_qa_snapshot,
)
from tests.pngread import chunks, decode

GREEN, RED, BLUE = (0, 255, 0), (255, 0, 0), (0, 0, 255)
SPACING_MM, THICKNESS_MM = 2.0, 5.0
ROWS = COLS = 64
SLICES = 24


def supine_phantom() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """HU and masks in HFS array order: (z up the table, y posterior, x patient's left).

    A water box (body) with a dense "heart" on the patient's left, anterior and
    in the upper third, and a small "cord" posterior on the midline.
    """
    hu = np.full((SLICES, ROWS, COLS), -1000.0, dtype=np.float32)
    body = np.zeros(hu.shape, dtype=bool)
    body[:, 12:52, 8:56] = True
    hu[body] = 0.0
    z, y, x = np.indices(hu.shape)
    heart = (((z - 16) * THICKNESS_MM) ** 2 + ((y - 22) * SPACING_MM) ** 2
             + ((x - 42) * SPACING_MM) ** 2) <= 14.0 ** 2
    hu[heart] = 60.0
    cord = (np.abs(y - 46) <= 1) & (np.abs(x - 32) <= 1) & (z >= 2) & (z <= 21)
    return hu, body, heart, cord


def make_volume(hu: np.ndarray, row_dir, col_dir, first_ipp, z_step) -> Volume:
    positions = np.array([np.asarray(first_ipp, float) + k * np.asarray(z_step, float)
                          for k in range(hu.shape[0])])
    return Volume(
        hu=hu, positions=positions, row_direction=np.asarray(row_dir, float),
        col_direction=np.asarray(col_dir, float), pixel_spacing=(SPACING_MM, SPACING_MM),
        sop_instance_uids=tuple(f"1.2.3.{k}" for k in range(hu.shape[0])),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4", frame_of_reference_uid="1.2.3.5",
        patient_position="HFS", header=Dataset(),
    )


def overlays(body, heart, cord) -> list[Overlay]:
    return [Overlay("External", body, GREEN, external=True), Overlay("Heart", heart, RED),
            Overlay("SpinalCord", cord, BLUE)]


def hfs() -> tuple[Volume, list[Overlay]]:
    hu, body, heart, cord = supine_phantom()
    volume = make_volume(hu, (1, 0, 0), (0, 1, 0), (-63.0, -63.0, -60.0), (0, 0, THICKNESS_MM))
    return volume, overlays(body, heart, cord)


def panels(volume: Volume, layers: list[Overlay], panel_px: int = 200) -> list[np.ndarray]:
    """The three views without their letter margins."""
    return [view[LABEL_PX:-LABEL_PX, LABEL_PX:-LABEL_PX]
            for view in render_views(volume, layers, panel_px=panel_px)]


def where(image: np.ndarray, color) -> tuple[np.ndarray, np.ndarray]:
    return np.nonzero((image == np.array(color, np.uint8)).all(axis=2))


def test_png_round_trips_exactly_with_valid_chunks():
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    data = encode_png(image)
    assert [tag for tag, _ in chunks(data)] == [b"IHDR", b"IDAT", b"IEND"]
    assert np.array_equal(decode(data), image)


def test_png_refuses_what_it_cannot_encode():
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4, 3), np.float32))


def test_planes_show_each_structure_in_its_colour_in_radiological_orientation():
    volume, layers = hfs()
    axial, coronal, sagittal = panels(volume, layers)
    for panel in (axial, coronal, sagittal):
        assert where(panel, GREEN)[0].size > 0
        assert where(panel, RED)[0].size > 0  # the planes cross at the organs, not the body
    # The heart is on the patient's left: the right half of the axial and coronal views.
    for panel in (axial, coronal):
        _, xs = where(panel, RED)
        assert xs.min() > panel.shape[1] / 2
    # ...anterior: the top of the axial view, the left of the sagittal view...
    assert where(axial, RED)[0].max() < axial.shape[0] / 2
    assert where(sagittal, RED)[1].max() < sagittal.shape[1] / 2
    # ...and superior (slices ascend toward the head): the top of coronal and sagittal.
    for panel in (coronal, sagittal):
        assert where(panel, RED)[0].max() < panel.shape[0] / 2
    # The cord is posterior on the midline: the bottom centre of the axial view.
    ys, xs = where(axial, BLUE)
    assert ys.min() > axial.shape[0] / 2
    assert abs(xs.mean() - axial.shape[1] / 2) < 3


def test_planes_keep_true_proportions_cropped_to_the_structures():
    volume, layers = hfs()
    axial, coronal, sagittal = panels(volume, layers)
    # The body spans columns 8-55 and rows 12-51 of the 64 x 64 grid (2 mm pixels)
    # and every slice; the views show that plus 15 mm, within the volume.
    span_x = min(55 * SPACING_MM + CROP_MARGIN_MM, (COLS - 1) * SPACING_MM) - (
        8 * SPACING_MM - CROP_MARGIN_MM)
    span_y = (51 - 12) * SPACING_MM + 2 * CROP_MARGIN_MM
    span_z = (SLICES - 1) * THICKNESS_MM
    assert axial.shape[1] == coronal.shape[1] == 200  # x is the largest span
    assert axial.shape[0] / axial.shape[1] == pytest.approx(span_y / span_x, rel=0.02)
    assert coronal.shape[0] / coronal.shape[1] == pytest.approx(span_z / span_x, rel=0.02)
    assert sagittal.shape[1] / coronal.shape[1] == pytest.approx(span_y / span_x, rel=0.02)
    # The body outline sits one margin inside the axial view's edges.
    step = span_x / 199
    _, xs = where(axial, GREEN)
    assert xs.min() == pytest.approx(CROP_MARGIN_MM / step, abs=2)


@pytest.mark.parametrize("position", ["HFP", "FFS"])
def test_prone_and_feet_first_series_look_like_supine(position):
    """Same patient, scanned another way: direction cosines, not array order, decide."""
    hu, body, heart, cord = supine_phantom()
    if position == "HFP":  # columns run to the patient's right, rows anterior
        def flip(a):
            return a[:, ::-1, ::-1]
        row_dir, col_dir = (-1, 0, 0), (0, -1, 0)
        first, step = (63.0, 63.0, -60.0), (0, 0, THICKNESS_MM)
    else:  # FFS: columns to the patient's right, slices ascend toward the feet
        def flip(a):
            return a[::-1, :, ::-1]
        row_dir, col_dir = (-1, 0, 0), (0, 1, 0)
        first, step = (63.0, -63.0, -60.0 + (SLICES - 1) * THICKNESS_MM), (0, 0, -THICKNESS_MM)
    volume = make_volume(np.ascontiguousarray(flip(hu)), row_dir, col_dir, first, step)
    reference, layers = hfs()
    turned = overlays(*(np.ascontiguousarray(flip(m)) for m in (body, heart, cord)))
    assert np.array_equal(render_qa(volume, turned, panel_px=200),
                          render_qa(reference, layers, panel_px=200))


def test_planes_cross_at_the_structures_centroid():
    volume, layers = hfs()
    heart_only = [layers[1]]
    axial, coronal, sagittal = panels(volume, heart_only)
    # Centred on the heart, every plane cuts it: red in all three panels.
    for panel in (axial, coronal, sagittal):
        assert where(panel, RED)[0].size > 0


def test_no_structures_still_renders_the_whole_volume():
    volume, _ = hfs()
    axial, coronal, sagittal = panels(volume, [], panel_px=120)
    assert axial.shape[:2] == (120, 120)  # 64 x 64 pixels of 2 mm, cropped to nothing
    assert coronal.shape[1] == 120 and sagittal.shape[1] == 120
    assert where(render_qa(volume, []), GREEN)[0].size == 0


def test_orientation_letters_sit_beside_the_image():
    volume, layers = hfs()
    for view in render_views(volume, layers, panel_px=120):
        margin = np.ones(view.shape[:2], dtype=bool)
        margin[LABEL_PX:-LABEL_PX, LABEL_PX:-LABEL_PX] = False
        letters = (view == LETTER_COLOR).all(axis=2)
        assert letters.sum() > 4 * 20 and not (letters & ~margin).any()


def test_snapshot_file_is_written_under_a_generated_name(tmp_path):
    volume, layers = hfs()
    relpath = qa_relpath(12, 3)
    assert relpath == "outbox/job12-v3-qa.png"
    path = tmp_path / relpath
    write_qa_snapshot(path, volume, layers, panel_px=160)
    image = decode(path.read_bytes())
    assert image.shape[0] > 160 / 2 and image.shape[1] > 3 * 80
    assert image[GAP_PX // 2, GAP_PX // 2].tolist() == list(BACKGROUND)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left


@pytest.mark.parametrize("position", ["HFS", "HFP", "FFS"])
def test_crops_render_as_their_full_masks_and_no_full_mask_is_built(position):
    import tracemalloc

    from oncoseg_node.contouring.mask_crop import MaskCrop

    hu, body, heart, cord = supine_phantom()
    turn = {"HFS": lambda a: a, "HFP": lambda a: a[:, ::-1, ::-1],
            "FFS": lambda a: a[::-1, :, ::-1]}[position]
    row_dir, col_dir, first, step = {
        "HFS": ((1, 0, 0), (0, 1, 0), (-63.0, -63.0, -60.0), (0, 0, THICKNESS_MM)),
        "HFP": ((-1, 0, 0), (0, -1, 0), (63.0, 63.0, -60.0), (0, 0, THICKNESS_MM)),
        "FFS": ((-1, 0, 0), (0, 1, 0), (63.0, -63.0, -60.0 + (SLICES - 1) * THICKNESS_MM),
                (0, 0, -THICKNESS_MM)),
    }[position]
    # a taller grid so that one full mask outweighs everything the snapshot draws
    tall = 8
    hu, masks = np.tile(hu, (tall, 1, 1)), [np.tile(m, (tall, 1, 1)) for m in (heart, cord)]
    volume = make_volume(np.ascontiguousarray(turn(hu)), row_dir, col_dir, first, step)
    full = [np.ascontiguousarray(turn(m)) for m in masks]
    crops = [MaskCrop.of(m) for m in full]
    layers = [Overlay("Heart", full[0], RED), Overlay("SpinalCord", full[1], BLUE)]
    cropped = [Overlay("Heart", crops[0], RED), Overlay("SpinalCord", crops[1], BLUE)]
    expected = render_qa(volume, layers, panel_px=120)
    tracemalloc.start()
    try:
        image = render_qa(volume, cropped, panel_px=120)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(image, expected)
    assert peak < hu.size, f"{peak} bytes traced; one full mask is {hu.size}"
