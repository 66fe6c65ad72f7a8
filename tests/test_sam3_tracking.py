"""How SAM3's tracker follows a structure: instances, re-anchoring, forgetting, memory, pairs.

Random tiny weights (``tests/sam3_tiny.py``): the tests check the tracker
loop's bookkeeping on real tracker sessions, never segmentation quality.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")


from oncoseg_node.contouring.engines.sam3.engine import Sam3Engine, _Choice  # noqa: E402
from oncoseg_node.contouring.engines.sam3.preprocess import (  # noqa: E402
    DEFAULT_WINDOW,
    SliceFrame,
)
from oncoseg_node.contouring.engines.sam3.track import Detection  # noqa: E402
from oncoseg_node.contouring.protocols import Structure  # noqa: E402
from oncoseg_node.contouring.sanity import body_midline_x  # noqa: E402
from tests.sam3_cases import (  # noqa: E402, F401  - fixtures are found by name
    STRUCTURES,
    cpu_config,
    engine,
    one_thread,
    phantom,
    tiny_dir,
)


def _tracked_objects(engine: Sam3Engine) -> list[int]:
    counts: list[int] = []
    engine.model.tracker_model.register_forward_pre_hook(
        lambda m, args, kwargs: counts.append(kwargs["inference_session"].get_obj_num()),
        with_kwargs=True)
    return counts


def _seed_slice_instances(engine: Sam3Engine, structure: Structure) -> int:
    volume = phantom()
    frame = SliceFrame(volume.shape[1], volume.shape[2], engine.image_size)
    with torch.inference_mode():
        _, hits, _ = engine._encode_and_detect(volume, frame, DEFAULT_WINDOW,
                                               engine._prompts([structure], [None]))
    candidates = engine._candidates(volume, frame, structure, False, hits, 0.0)
    seed = max((d for dets in candidates for d in dets), key=lambda d: d.score)
    return len(candidates[seed.z])


def test_a_single_organ_tracks_only_its_best_instance(tiny_dir: Path):
    """Other detections on the seed slice are not merged into a one-part organ."""
    engine = Sam3Engine.from_config(cpu_config(tiny_dir))
    liver = replace(STRUCTURES[0], negative_concepts=())
    assert _seed_slice_instances(engine, liver) >= 2  # the case under test exists
    counts = _tracked_objects(engine)
    engine.segment(phantom(), [liver])
    assert counts and set(counts) == {1}


def test_a_multi_part_structure_tracks_every_instance(tiny_dir: Path):
    engine = Sam3Engine.from_config(cpu_config(tiny_dir))
    bowel = replace(STRUCTURES[0], negative_concepts=(), parts="many")
    instances = _seed_slice_instances(engine, bowel)
    assert instances >= 2
    counts = _tracked_objects(engine)
    engine.segment(phantom(), [bowel])
    assert counts and set(counts) == {instances}


# -- the tracker loop: re-anchoring, forgetting, memory ----------------------------------


def test_tracking_rules_come_from_the_checkpoint_config(engine: Sam3Engine):
    """transformers' Sam3VideoConfig defaults: re-anchor every 16 slices at 0.8 / 0.8."""
    follow = engine.tracking
    assert (follow.reanchor_every, follow.high_conf, follow.high_iou) == (16, 0.8, 0.8)
    assert follow.assoc_iou == engine.assoc_iou and follow.max_gap == 2


def _run_on_tiny(engine: Sam3Engine, **settings):
    """A tracker run over the tiny phantom's cached features, and its seed."""
    from oncoseg_node.contouring.engines.sam3.follow import TrackerRun

    volume = phantom(slices=6)
    frame = SliceFrame(volume.shape[1], volume.shape[2], engine.image_size)
    with torch.inference_mode():
        store, hits, _ = engine._encode_and_detect(volume, frame, DEFAULT_WINDOW,
                                                   engine._prompts(STRUCTURES[:1], [None]))
    candidates = engine._candidates(volume, frame, STRUCTURES[0], False, hits, 0.0)
    seed = max((d for dets in candidates for d in dets), key=lambda d: d.score)
    run = TrackerRun(engine.model.tracker_model, store, engine.device, engine.dtype,
                     replace(engine.tracking, **settings))
    return run, seed, candidates


def test_full_resolution_masks_are_freed_and_dropped_slices_forgotten(engine: Sam3Engine):
    from oncoseg_node.contouring.engines.sam3.follow import follow

    run, seed, candidates = _run_on_tiny(engine)
    with torch.inference_mode():
        track = follow(run, [seed], candidates)
    stored = run.session.output_dict_per_obj[0]
    outputs = [*stored["cond_frame_outputs"].values(), *stored["non_cond_frame_outputs"].values()]
    assert outputs and all("high_res_masks" not in out for out in outputs)
    assert all("maskmem_features" in out for out in outputs)  # memory itself is kept
    kept = run.stored_slices()
    assert kept["cond_frame_outputs"] | kept["non_cond_frame_outputs"] == set(track.logits)
    assert set(run.session.frames_tracked_per_obj[0]) <= set(track.logits)


@pytest.fixture(scope="module")
def present_engine(tiny_dir: Path) -> Sam3Engine:
    """The tiny model with its object-score head biased so the tracker always reports the object.

    Random weights often call the object absent one slice from its seed; the
    re-anchoring plumbing needs slices where it is present.
    """
    engine = Sam3Engine.from_config(cpu_config(tiny_dir))
    with torch.no_grad():
        engine.model.tracker_model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(20.0)
    return engine


def test_a_confident_detection_re_anchors_the_tracked_slice(present_engine: Sam3Engine):
    """Plumbing on random weights: with the thresholds at 0 any agreeing detection is confident."""
    run, seed, candidates = _run_on_tiny(present_engine, high_conf=0.0, high_iou=0.0)
    z = seed.z + 1 if seed.z + 1 < 6 else seed.z - 1
    with torch.inference_mode():
        run.seed(seed.z, [seed.mask])
        logits = run.step(z, z < seed.z)
        assert logits is not None
        agreeing = Detection(z, 0.99, torch.from_numpy(logits > 0))
        assert not run.anchor(z + 1, [agreeing])  # only the slice just stepped can be anchored
        assert run.anchor(z, [agreeing])
    assert run.stored_slices()["cond_frame_outputs"] == {seed.z, z}
    strict, seed, _ = _run_on_tiny(present_engine)  # real thresholds: a 0.5 score never anchors
    with torch.inference_mode():
        strict.seed(seed.z, [seed.mask])
        logits = strict.step(z, z < seed.z)
        assert not strict.anchor(z, [Detection(z, 0.5, torch.from_numpy(logits > 0))])
    assert strict.stored_slices()["cond_frame_outputs"] == {seed.z}


def test_left_and_right_of_a_paired_organ_never_share_a_voxel(present_engine: Sam3Engine):
    """Two seeds overlapping across the midline: the tracked sides must split the overlap."""
    engine = present_engine
    volume = phantom()
    frame = SliceFrame(volume.shape[1], volume.shape[2], engine.image_size)
    left = Structure("Parotid_L", (1, 2, 3), engine="sam3", concepts=("parotid gland",),
                     laterality="left")
    right = replace(left, name="Parotid_R", laterality="right")
    size = 4 * engine.image_size // 14
    patient_left, patient_right = (torch.zeros(size, size, dtype=torch.bool) for _ in range(2))
    patient_left[8:20, 16:26] = True  # image right of the centre: the patient's left (+x rows)
    patient_right[8:20, 6:17] = True  # one column shared: not a duplicate for NMS
    hits = {("parotid gland", None): [[] for _ in range(volume.shape[0])]}
    hits[("parotid gland", None)][2] = [Detection(2, 0.9, patient_left),
                                        Detection(2, 0.8, patient_right)]
    best = {("parotid gland", None): np.full(volume.shape[0], 0.9)}
    with torch.inference_mode():
        store, _, _ = engine._encode_and_detect(volume, frame, DEFAULT_WINDOW, [])
        chosen = {i: engine._choose(volume, frame, s, False, store, hits, best,
                                    body_midline_x(volume)) for i, s in enumerate((left, right))}
    assert all(isinstance(c, _Choice) for c in chosen.values()), chosen
    tracks = [chosen[i].track for i in (0, 1)]
    overlap = (tracks[0].logits[2] > 0) & (tracks[1].logits[2] > 0)
    assert overlap.any()  # the case under test: both sides claim the midline band
    results = engine._finish(volume, frame, (left, right), chosen)
    assert results[0].mask is not None and results[1].mask is not None
    assert results[0].mask[2].any() and results[1].mask[2].any()
    assert not (results[0].mask & results[1].mask).any()
