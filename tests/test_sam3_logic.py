"""SAM3 engine logic that needs no model: preprocessing, NMS, clean-up, seeds, propagation."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from oncoseg_node.contouring.engines.sam3.nms import (  # noqa: E402
    clean_mask_logits,
    mask_nms,
    pairwise_mask_iou,
)
from oncoseg_node.contouring.engines.sam3.preprocess import (  # noqa: E402
    SliceFrame,
    mask_centroid_index,
    window_to_unit,
)
from oncoseg_node.contouring.engines.sam3.track import (  # noqa: E402
    Detection,
    FeatureStore,
    Track,
    next_seed,
    propagate,
    support_score,
)


def box_mask(shape: tuple[int, int], r0: int, c0: int, r1: int, c1: int) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[r0:r1, c0:c1] = True
    return mask


# -- preprocessing ---------------------------------------------------------------


def test_ct_window_then_onco_seg_normalisation():
    hu = np.array([[-2000.0, -1000.0, 0.0, 1000.0, 3000.0]])
    unit = window_to_unit(hu)
    assert unit.tolist() == [[0.0, 0.0, 0.5, 1.0, 1.0]]
    frame = SliceFrame(rows=1, cols=5, size=5)
    pixels = frame.to_model(unit[None], "cpu", torch.float32)
    assert pixels.shape == (1, 3, 5, 5)
    # row 0 carries the slice, (x - 0.5) / 0.5 maps [0, 1] to [-1, 1]; the padding is air (-1)
    assert pixels[0, 0, 0].tolist() == [-1.0, -1.0, 0.0, 1.0, 1.0]
    assert torch.all(pixels[0, :, 1:] == -1.0)
    assert torch.equal(pixels[0, 0], pixels[0, 2])  # grey replicated to three channels


def test_structure_window_changes_the_scaling():
    unit = window_to_unit(np.array([-160.0, 40.0, 240.0]), (-160.0, 240.0))
    assert unit.tolist() == pytest.approx([0.0, 0.5, 1.0])
    with pytest.raises(ValueError):
        window_to_unit(np.zeros(2), (100.0, 100.0))


def test_non_square_slice_is_padded_not_stretched_and_masks_map_back():
    frame = SliceFrame(rows=40, cols=80, size=32)
    # a logit map on the model frame that is positive on the left half of the padded square
    logits = torch.full((1, 32, 32), -5.0)
    logits[0, :, :16] = 5.0
    mask = frame.logits_to_ct(logits)
    assert mask.shape == (1, 40, 80)
    assert mask[0, :, :40].all() and not mask[0, :, 40:].any()
    # the centre of the low-res grid is the centre of the 80 x 80 padded square
    rows, cols = frame.lowres_to_index(np.array([15.5]), np.array([15.5]), (32, 32))
    assert rows[0] == pytest.approx(39.5) and cols[0] == pytest.approx(39.5)
    # low-res pixels 0-3 span CT edges [0, 10): their centroid is CT index 4.5
    centre = mask_centroid_index(frame, box_mask((32, 32), 0, 0, 4, 4))
    assert centre == pytest.approx((4.5, 4.5))


def test_box_prompt_in_model_coordinates():
    frame = SliceFrame(rows=100, cols=200, size=1008)
    cx, cy, w, h = frame.box_to_model((10, 20, 29, 59))  # rows 10-29, cols 20-59 inclusive
    assert (cx, cy, w, h) == pytest.approx((40 / 200, 20 / 200, 40 / 200, 20 / 200))


# -- NMS and clean-up --------------------------------------------------------------


def test_mask_iou_matches_direct_count():
    a = box_mask((20, 20), 0, 0, 10, 10)
    b = box_mask((20, 20), 5, 5, 15, 15)
    iou = pairwise_mask_iou(torch.stack([a, b]), torch.stack([a, b]))
    assert iou[0, 0] == 1.0 and iou[0, 1] == pytest.approx(25 / 175)


def test_nms_drops_duplicates_keeps_distinct_best_first():
    a = box_mask((20, 20), 0, 0, 10, 10)
    a2 = box_mask((20, 20), 0, 0, 10, 9)  # near duplicate of a
    b = box_mask((20, 20), 12, 12, 18, 18)
    empty = torch.zeros(20, 20, dtype=torch.bool)
    masks = torch.stack([a2, a, b, empty])
    keep = mask_nms(masks, torch.tensor([0.8, 0.9, 0.6, 0.99]), 0.5, max_keep=10,
                    max_candidates=10)
    assert keep.tolist() == [1, 2]  # a beats its duplicate; the empty mask never counts


def test_nms_object_count_is_bounded_whatever_the_threshold():
    rng = np.random.default_rng(0)
    masks = torch.from_numpy(rng.random((300, 24, 24)) > 0.5)  # 300 unrelated noise masks
    scores = torch.from_numpy(rng.random(300))
    keep = mask_nms(masks, scores, 0.9, max_keep=4, max_candidates=50)
    assert len(keep) == 4
    top50 = set(torch.argsort(scores, descending=True)[:50].tolist())
    assert set(keep.tolist()) <= top50  # only the capped candidates were ever compared


def test_clean_fills_small_holes_and_drops_specks_but_keeps_the_organ():
    logits = np.full((30, 30), -3.0, dtype=np.float32)
    logits[5:20, 5:20] = 3.0
    logits[10:12, 10:12] = -3.0  # a 4-pixel hole
    logits[25:27, 25:27] = 3.0  # a 4-pixel speck
    out = clean_mask_logits(logits, max_area=16)
    assert (out[10:12, 10:12] > 0).all()
    assert (out[25:27, 25:27] <= 0).all()
    assert (out[5:20, 5:20] > 0).all()
    tiny = np.full((30, 30), -3.0, dtype=np.float32)
    tiny[3:5, 3:5] = 3.0  # the only object, smaller than max_area: kept
    assert (clean_mask_logits(tiny, 16) > 0).sum() == 4


# -- seeds, support and propagation ------------------------------------------------


def test_support_is_best_overlapping_detection():
    tracked = box_mask((20, 20), 0, 0, 10, 10)
    near = Detection(3, 0.7, box_mask((20, 20), 1, 1, 10, 10))
    far = Detection(3, 0.95, box_mask((20, 20), 15, 15, 20, 20))
    assert support_score(tracked, [near, far], 0.1) == pytest.approx(0.7)
    assert support_score(tracked, [far], 0.1) == 0.0
    # a detection mask on another grid is resized before comparing
    coarse = Detection(3, 0.5, box_mask((10, 10), 0, 0, 5, 5))
    assert support_score(tracked, [coarse], 0.9) == pytest.approx(0.5)


def test_next_seed_skips_instances_already_tracked():
    a = Detection(2, 0.9, box_mask((20, 20), 0, 0, 8, 8))
    b = Detection(2, 0.8, box_mask((20, 20), 10, 10, 18, 18))
    c = Detection(4, 0.7, box_mask((20, 20), 0, 0, 8, 8))
    candidates = [[], [], [a, b], [], [c]]
    assert next_seed(candidates, [], 0.1) is a
    done = Track(logits={2: np.where(a.mask.numpy(), 5.0, -5.0),
                         4: np.where(c.mask.numpy(), 5.0, -5.0)})
    assert next_seed(candidates, [done], 0.1) is b
    assert next_seed([[], [], [a], [], [c]], [done], 0.1) is None


def test_propagation_runs_both_ways_and_stops_where_the_structure_ends():
    """Slices 3..8 hold the organ; the tracker drifts on past it, unconfirmed."""
    organ = np.where(box_mask((16, 16), 4, 4, 12, 12).numpy(), 4.0, -4.0).astype(np.float32)
    confirmed = {3, 4, 5, 7, 8}  # slice 6 missed by the detector: a gap inside the organ
    calls: list[tuple[int, bool]] = []

    def step(z: int, reverse: bool):
        calls.append((z, reverse))
        return None if z == 0 else organ  # the tracker itself gives up only at slice 0

    def support(z: int, mask: torch.Tensor) -> float:
        return 0.8 if z in confirmed else 0.0

    track = propagate(5, organ, 12, step, support, max_gap=1)
    assert sorted(track.logits) == [3, 4, 5, 6, 7, 8]
    assert track.support[6] == 0.0 and track.support[5] == 0.8
    assert track.score == pytest.approx(0.8 * 5 / 6)
    # forward: 6 (gap), 7, 8, then 9 and 10 unconfirmed -> stop; backward: 4, 3, 2, 1 -> stop
    assert calls == [(6, False), (7, False), (8, False), (9, False), (10, False),
                     (4, True), (3, True), (2, True), (1, True)]


def test_propagation_stops_when_the_tracker_loses_the_object():
    organ = np.where(box_mask((8, 8), 2, 2, 6, 6).numpy(), 4.0, -4.0).astype(np.float32)
    empty = np.full((8, 8), -4.0, dtype=np.float32)
    track = propagate(2, organ, 6, lambda z, r: empty if z == 3 else organ,
                      lambda z, m: 0.9, max_gap=0)
    assert sorted(track.logits) == [0, 1, 2]


def test_feature_store_serves_one_slice_and_refuses_to_encode():
    store = FeatureStore(5, torch.device("cpu"))
    feats = [torch.arange(4 * 2 * 3, dtype=torch.float32).view(4, 2, 3), torch.ones(1, 2, 8)]
    pos = [torch.zeros(4, 2, 3), torch.zeros(1, 2, 8)]
    store.put(3, feats, pos)
    got = store.get_vision_features(4)
    assert torch.equal(got["vision_feats"][0][:, 0], feats[0][:, 1])
    assert got["vision_feats"][1].shape == (1, 1, 8) and got["vision_pos_embeds"][0].shape == (
        4, 1, 3)
    with pytest.raises(IndexError):
        store.get_vision_features(5)
    with pytest.raises(RuntimeError):
        store.cache_vision_features(0, {})


# -- packaging and configuration ----------------------------------------------------


def test_no_torchvision_patch_ships_in_the_package():
    """torchvision is a real, pinned dependency: importing it is fine, faking it is not."""
    import re
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "oncoseg_node"
    patch = re.compile(r"sys\.modules\[[^]]*torchvision|torchvision\.\w+(\.\w+)* *= ")
    offenders = [p.name for p in package.rglob("*.py") if patch.search(p.read_text())]
    assert offenders == []


def test_sam3_settings_parse_and_are_checked(make_config):
    from oncoseg_node.errors import ConfigError

    sam3 = {"device": "cpu", "max_instances": 3, "track_gap_slices": 0, "batch_size": 2}
    config = make_config(engine={"name": "classical", "sam3": sam3})
    assert (config.engine.sam3.max_instances, config.engine.sam3.track_gap_slices) == (3, 0)
    with pytest.raises(ConfigError) as err:
        make_config(engine={"name": "classical",
                            "sam3": {**sam3, "max_instances": 0, "track_gap_slices": -1}})
    assert "engine.sam3.max_instances" in str(err.value)
    assert "engine.sam3.track_gap_slices" in str(err.value)


def test_confirmed_slices_are_offered_for_re_anchoring_every_n_from_the_seed():
    organ = np.where(box_mask((8, 8), 2, 2, 6, 6).numpy(), 4.0, -4.0).astype(np.float32)
    offered: list[int] = []

    def anchor(z: int) -> bool:
        offered.append(z)
        return z != 9  # slice 9 is offered but its detection is not confident enough

    unconfirmed = {4, 13}
    track = propagate(5, organ, 20, lambda z, r: organ,
                      lambda z, m: 0.0 if z in unconfirmed else 0.9, max_gap=0,
                      anchor=anchor, anchor_every=4)
    # forward 6..12 (13 unconfirmed ends it), backward stops at the unconfirmed slice 4
    assert sorted(track.logits) == list(range(5, 13))
    assert offered == [9] and track.anchors == []
    track = propagate(5, organ, 20, lambda z, r: organ, lambda z, m: 0.9, max_gap=0,
                      anchor=anchor, anchor_every=4)
    assert offered[1:] == [9, 13, 17, 1] and track.anchors == [13, 17, 1]
    offered.clear()
    propagate(5, organ, 20, lambda z, r: organ, lambda z, m: 0.9, max_gap=0, anchor=anchor,
              anchor_every=0)
    assert offered == []  # 0 switches re-anchoring off, as in transformers


def test_slices_dropped_past_the_organ_are_forgotten_before_the_reverse_pass():
    organ = np.where(box_mask((8, 8), 2, 2, 6, 6).numpy(), 4.0, -4.0).astype(np.float32)
    events: list[tuple[str, object]] = []

    def step(z: int, reverse: bool):
        events.append(("step", z))
        return None if z == 0 else organ

    def support(z: int, mask: torch.Tensor) -> float:
        return 0.8 if 2 <= z <= 6 else 0.0

    track = propagate(4, organ, 12, step, support, max_gap=2,
                      forget=lambda zs: events.append(("forget", list(zs))))
    assert sorted(track.logits) == [2, 3, 4, 5, 6]
    assert events == [("step", 5), ("step", 6), ("step", 7), ("step", 8), ("step", 9),
                      ("forget", [7, 8, 9]),
                      ("step", 3), ("step", 2), ("step", 1), ("step", 0),
                      ("forget", [1, 0])]


def test_paired_organs_compete_for_pixels():
    from oncoseg_node.contouring.engines.sam3.pairs import compete, pair_key
    from oncoseg_node.contouring.protocols import Structure

    left = Track(logits={3: np.array([[5.0, 2.0, -1.0]], dtype=np.float32),
                         4: np.array([[1.0, 1.0, 1.0]], dtype=np.float32)})
    right = Track(logits={3: np.array([[1.0, 3.0, 4.0]], dtype=np.float32)})
    assert compete([left, right]) == 2
    assert (left.logits[3] > 0).tolist() == [[True, False, False]]
    assert (right.logits[3] > 0).tolist() == [[False, True, True]]
    assert left.logits[3][0, 0] == 5.0 and right.logits[3][0, 2] == 4.0  # winners untouched
    assert (left.logits[4] > 0).all()  # a slice only one side reaches stays as it is
    sided = Structure("Parotid_L", (1, 2, 3), laterality="left")
    assert pair_key(sided) == "Parotid"
    assert pair_key(Structure("Parotid_R", (1, 2, 3), laterality="right")) == "Parotid"
    assert pair_key(Structure("Parotid_L", (1, 2, 3))) is None
    assert pair_key(Structure("Heart", (1, 2, 3), laterality="left")) is None
