"""Following one structure through the slices with SAM3's tracker, as SAM3's own loop does.

One :class:`TrackerRun` per structure and seed: a tracker session over the
series' cached features (:class:`~.track.SliceSession`), seeded with
mask prompts on one slice and stepped both ways by
:func:`~.track.propagate`. Three things transformers' detector-tracker
loop (``Sam3VideoModel``) does are done here too:

- every ``recondition_every_nth_frame`` slices, a slice where a detection
  scoring at least ``high_conf_thresh`` overlaps the tracked mask by at least
  ``high_iou_thresh``, and the tracker itself is that confident, becomes a
  conditioning frame: its memory (of the tracked mask, as with transformers'
  default ``recondition_on_trk_masks``) anchors the slices that follow;
- the slices a pass stepped through past the organ's end are removed from
  the session before the reverse pass, so their drift never becomes memory;
- the full-resolution masks the tracker keeps per slice and object (only
  needed to encode that slice's memory) are dropped as soon as it is encoded:
  at 1008 px they would hold 4 MB per slice and object until the series ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from oncoseg_node.contouring.engines.sam3.nms import clean_mask_logits, pairwise_mask_iou
from oncoseg_node.contouring.engines.sam3.track import (
    Detection,
    FeatureStore,
    SliceSession,
    Track,
    propagate,
    resize_mask,
    support_score,
)

DROPPED_WHEN_ENCODED = ("high_res_masks",)


@dataclass(frozen=True)
class FollowSettings:
    """The tracking rules, from the checkpoint's ``Sam3VideoConfig`` and the node config."""

    assoc_iou: float  # a detection this close to the tracked mask confirms it
    fill_hole_area: int
    max_gap: int  # unconfirmed slices bridged inside an organ
    reanchor_every: int  # 0: never re-anchor
    high_conf: float
    high_iou: float

    @classmethod
    def from_model(cls, model_config, max_gap: int) -> FollowSettings:
        return cls(assoc_iou=float(model_config.assoc_iou_thresh),
                   fill_hole_area=int(model_config.fill_hole_area), max_gap=int(max_gap),
                   reanchor_every=int(model_config.recondition_every_nth_frame),
                   high_conf=float(model_config.high_conf_thresh),
                   high_iou=float(model_config.high_iou_thresh))


class TrackerRun:
    """One tracker session following the instances seeded on one slice."""

    def __init__(self, tracker, store: FeatureStore, device: torch.device, dtype: torch.dtype,
                 settings: FollowSettings) -> None:
        self.tracker = tracker
        self.session = SliceSession(store, device, dtype)
        self.settings = settings
        self._last: tuple[int, torch.Tensor, torch.Tensor] | None = None  # z, logits, scores

    @property
    def objects(self) -> int:
        return self.session.get_obj_num()

    def seed(self, z: int, masks: Sequence[torch.Tensor]) -> np.ndarray | None:
        """Prompt each boolean model-frame mask as one object on slice ``z``; its logits."""
        for obj_id, mask in enumerate(masks):
            self.session.add_mask_inputs(self.session.obj_id_to_idx(obj_id), z,
                                         mask[None, None].float())
        self.session.obj_with_new_inputs = list(range(len(masks)))
        return self.step(z, False)

    def step(self, z: int, reverse: bool) -> np.ndarray | None:
        """The union of the present objects' mask logits on slice ``z``; None when all are gone."""
        out = self.tracker(inference_session=self.session, frame_idx=z, reverse=reverse)
        self._drop_encoded(z)
        scores = out.object_score_logits.float().reshape(-1)
        logits = out.pred_masks.float().reshape(scores.shape[0], *out.pred_masks.shape[-2:])
        self._last = (z, logits, scores)
        present = scores > 0
        if not bool(present.any()):
            return None
        combined = logits[present].amax(0).cpu().numpy()
        return clean_mask_logits(combined, self.settings.fill_hole_area)

    def anchor(self, z: int, detections: Sequence[Detection]) -> bool:
        """Make slice ``z`` a conditioning frame for each object a confident detection confirms."""
        if self._last is None or self._last[0] != z:
            return False
        _, logits, scores = self._last
        confident = [d for d in detections if d.score >= self.settings.high_conf]
        anchored = False
        for obj_idx in range(logits.shape[0]):
            mask = (logits[obj_idx] > 0).cpu()
            if not confident or not bool(mask.any()):
                continue
            if float(torch.sigmoid(scores[obj_idx])) <= self.settings.high_conf:
                continue
            dets = torch.stack([resize_mask(d.mask, (mask.shape[0], mask.shape[1]))
                                for d in confident])
            if float(pairwise_mask_iou(mask[None], dets).max()) < self.settings.high_iou:
                continue
            outputs = self.session.output_dict_per_obj[obj_idx]
            if z in outputs["non_cond_frame_outputs"]:
                outputs["cond_frame_outputs"][z] = outputs["non_cond_frame_outputs"].pop(z)
                anchored = True
        return anchored

    def forget(self, slices: Sequence[int]) -> None:
        """Remove what the tracker stored for ``slices``: they are not part of the organ."""
        for obj_idx in range(self.objects):
            outputs = self.session.output_dict_per_obj[obj_idx]
            for z in slices:
                outputs["non_cond_frame_outputs"].pop(z, None)
                self.session.frames_tracked_per_obj[obj_idx].pop(z, None)

    def stored_slices(self) -> dict[str, set[int]]:
        """Slices holding tracker outputs, by kind (for checks and the memory estimate)."""
        kinds: dict[str, set[int]] = {"cond_frame_outputs": set(), "non_cond_frame_outputs": set()}
        for outputs in self.session.output_dict_per_obj.values():
            for kind, frames in kinds.items():
                frames.update(outputs[kind])
        return kinds

    def _drop_encoded(self, z: int) -> None:
        for outputs in self.session.output_dict_per_obj.values():
            for kind in ("cond_frame_outputs", "non_cond_frame_outputs"):
                stored = outputs[kind].get(z)
                if stored is not None:
                    for key in DROPPED_WHEN_ENCODED:
                        stored.pop(key, None)


def follow(run: TrackerRun, seeds: Sequence[Detection],
           candidates: Sequence[Sequence[Detection]]) -> Track:
    """Track ``seeds`` (all on one slice, the best first) both ways through the series."""
    seed = seeds[0]
    seed_logits = run.seed(seed.z, [d.mask for d in seeds])
    if seed_logits is None:  # a mask prompt is its own output; cannot be absent
        seed_logits = np.where(seed.mask.numpy(), 10.0, -10.0).astype(np.float32)
    settings = run.settings

    def support(z: int, mask: torch.Tensor) -> float:
        return support_score(mask, candidates[z], settings.assoc_iou)

    return propagate(seed.z, seed_logits, run.session.num_frames, run.step, support,
                     max_gap=settings.max_gap, anchor=lambda z: run.anchor(z, candidates[z]),
                     anchor_every=settings.reanchor_every, forget=run.forget)
