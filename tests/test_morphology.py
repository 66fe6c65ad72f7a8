"""The slab-wise morphology the classical engine is built from, against scipy's own."""

from __future__ import annotations

import dataclasses
import multiprocessing

import numpy as np
import pytest
from scipy import ndimage

from oncoseg_node.commissioning.phantom import make_phantom
from oncoseg_node.contouring.engines.classical import engine as classical
from oncoseg_node.contouring.engines.classical import slabs
from oncoseg_node.contouring.engines.classical.blocks import bbox, box_by_slab, rows_box
from oncoseg_node.contouring.engines.classical.labels import (
    IN_PLANE,
    LabelStats,
    compact_label,
    enclosed,
    enclosed_regions,
)
from oncoseg_node.contouring.engines.classical.morphology import fill_holes


def rings(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Random open and closed rings: holes of many sizes, some cut by the image edge."""
    rng = np.random.default_rng(seed)
    dots = rng.random(shape) > 0.985
    grown = ndimage.binary_dilation(dots, np.ones((1, 7, 7)))
    return grown & ~ndimage.binary_erosion(grown, np.ones((1, 3, 3)))


@pytest.mark.parametrize("shape", [(1, 30, 40), (17, 61, 45), (40, 33, 90)])
def test_enclosed_and_its_labels_are_scipys(shape):
    mask = rings(shape, seed=sum(shape))
    filled = np.stack([ndimage.binary_fill_holes(s) for s in mask])
    holes = filled & ~mask
    assert holes.sum() > 20  # the rings really enclose something
    assert np.array_equal(fill_holes(mask), filled)
    assert np.array_equal(enclosed(mask), holes)
    expected, count = ndimage.label(holes, structure=IN_PLANE)
    regions = enclosed_regions(mask)
    assert regions.count == count
    labels = np.zeros(shape, dtype=np.int64)
    labels.ravel()[regions.flat] = regions.lab
    assert np.array_equal(labels, expected)
    assert np.array_equal(regions.size, np.bincount(expected.ravel())[1:])


def test_holes_of_an_empty_or_full_mask():
    empty = np.zeros((20, 10, 12), dtype=bool)
    assert not fill_holes(empty).any() and not enclosed(empty).any()
    assert enclosed_regions(empty).count == 0
    full = np.ones((20, 10, 12), dtype=bool)
    assert fill_holes(full).all() and not enclosed(full).any()


def test_fill_holes_into_the_mask_itself():
    mask = rings((18, 40, 40), seed=5)
    expected = fill_holes(mask)
    assert fill_holes(mask, out=mask) is mask
    assert np.array_equal(mask, expected)


def test_compact_label_into_a_reused_buffer():
    mask = rings((5, 30, 30), seed=9)
    expected, count = ndimage.label(mask)
    buffer = np.full(mask.shape, 7, dtype=np.uint16)
    labels, found = compact_label(mask, out=buffer)
    assert labels is buffer and found == count and np.array_equal(labels, expected)
    # more pieces than uint16 holds: labelled again into a new int32 array
    dots = np.zeros((1, 600, 600), dtype=bool)
    dots[0, ::2, ::2] = True
    labels, found = compact_label(dots, out=np.zeros(dots.shape, dtype=np.uint16))
    assert found == 90000 and labels.dtype == np.int32 and labels.max() == 90000


def test_box_by_slab_is_bbox_whatever_block_it_searches():
    rng = np.random.default_rng(4)
    mask = np.zeros((37, 50, 60), dtype=bool)
    mask[20:30, 10:12, 40:44] = rng.random((10, 2, 4)) > 0.3
    whole = (slice(0, 37), slice(0, 50), slice(0, 60))
    part = (slice(15, 37), slice(5, 20), slice(30, 60))
    for pad in (0, 2, 11):
        for origin in (whole, part):
            found = box_by_slab(origin, mask.shape,
                                lambda rows, o=origin: mask[rows_box(o, rows)],
                                pad=pad)
            assert found == bbox(mask, pad=pad)
    assert box_by_slab(whole, mask.shape, lambda rows: np.zeros((1, 50, 60), bool)) is None


def test_label_stats_mean_and_sd_of_int16_do_not_overflow():
    labels = np.array([[[1, 1, 2, 2, 0]]], dtype=np.uint16)
    values = np.array([[[3000, 1000, -1000, -1000, 5]]], dtype=np.int16)
    mean, sd = LabelStats(labels, 2).mean_and_sd(values)
    assert np.allclose(mean, [2000.0, -1000.0]) and np.allclose(sd, [1000.0, 0.0])
    mean, sd = LabelStats(labels, 2).mean_and_sd(values, values > 0)
    assert np.allclose(mean[0], 2000.0) and np.isnan(mean[1]) and np.isnan(sd[1])


def test_bones_and_canal_the_same_from_float32_and_int16_hu():
    # Integer HU (as series store them) give the same masks whether held as int16
    # (the volume's own type) or as float32: no step truncates or overflows.
    p = make_phantom(slices=40, rows=256, columns=256, pixel_spacing=(1.95, 1.95), seed=3)
    volume = p.volume
    body = classical.external(volume)
    mid = classical.midlines(volume, body)
    results = {}
    for dtype in (np.int16, np.float32):
        held = dataclasses.replace(volume, hu=volume.hu.astype(dtype))
        results[dtype] = classical.bones_and_canal(held, body, mid)
    bones, canal = results[np.int16]
    assert bones.sum() > 1000 and canal.sum() > 100
    assert np.array_equal(results[np.float32][0], bones)
    assert np.array_equal(results[np.float32][1], canal)


def test_each_slab_keeps_order_and_runs_nested_steps_in_place():
    def inner(k: int) -> int:
        return k * k

    def outer(k: int) -> list[int]:
        return slabs.each_slab(inner, range(k, k + 3))

    assert slabs.each_slab(outer, range(5)) == [[k * k for k in range(j, j + 3)]
                                                      for j in range(5)]


def test_bones_and_canal_the_same_on_one_thread_as_on_several(monkeypatch):
    p = make_phantom(slices=40, rows=256, columns=256, pixel_spacing=(1.95, 1.95), seed=4,
                     patient_position="FFP")
    body = classical.external(p.volume)
    mid = classical.midlines(p.volume, body)
    monkeypatch.setattr(slabs, "WORKERS", 2)
    bones, canal = classical.bones_and_canal(p.volume, body, mid)
    monkeypatch.setattr(slabs, "WORKERS", 1)
    bones1, canal1 = classical.bones_and_canal(p.volume, body, mid)
    assert bones.sum() > 1000 and canal.sum() > 100
    assert np.array_equal(bones, bones1) and np.array_equal(canal, canal1)


def test_each_slab_in_a_forked_child():
    slabs.each_slab(abs, range(-3, 3))  # the parent's pool exists
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        result = pool.apply_async(slabs.each_slab, (abs, range(-3, 3)))
        assert result.get(timeout=30) == [3, 2, 1, 0, 1, 2]


def test_the_canal_pieces_touching_a_seed_are_those_of_one_labelling_of_the_box():
    from oncoseg_node.contouring.engines.classical.canal import _inside

    rng = np.random.default_rng(11)
    for density in (0.3, 0.55, 0.8):
        mask = rng.random((21, 40, 33)) < density
        seed = (rng.random(mask.shape) < 0.01) & (rng.random(mask.shape[0]) < 0.6)[:, None, None]
        labels, count = ndimage.label(mask, structure=IN_PLANE)
        keep = np.zeros(count + 1, dtype=bool)
        keep[np.unique(labels[seed & mask])] = True
        keep[0] = False
        assert np.array_equal(_inside(seed, mask), keep[labels])
