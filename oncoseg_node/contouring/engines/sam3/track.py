"""Detect-and-track bookkeeping for SAM3: cached slice features, seeds, propagation.

The tracker (``Sam3TrackerVideoModel``) treats the slices of a series as video
frames. Its image features come from :class:`FeatureStore`, filled once per
series (and HU window) while the detector runs, so tracking a structure
never re-encodes a slice. Propagation starts at the best detection and runs
towards the head and the feet; it stops where the tracker says the object is
gone, or where the detector has not confirmed the tracked mask for more than
``max_gap`` slices (the structure has ended and the tracker is drifting).

Everything here except :class:`SliceSession` is plain control flow over
callables and tensors, so it is tested without a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import (
    Sam3TrackerVideoInferenceSession,
)

from oncoseg_node.contouring.engines.sam3.nms import pairwise_mask_iou


@dataclass(frozen=True, eq=False)
class Detection:
    """One detected instance on slice ``z``: presence-weighted score and model-frame mask."""

    z: int
    score: float
    mask: torch.Tensor  # bool (h, w), model frame, on the CPU


@dataclass
class Track:
    """A structure followed through the slices: mask logits and detector support per slice."""

    logits: dict[int, np.ndarray] = field(default_factory=dict)
    support: dict[int, float] = field(default_factory=dict)
    anchors: list[int] = field(default_factory=list)  # slices made conditioning frames

    @property
    def score(self) -> float:
        """Mean detector score over the tracked slices (0 for slices nothing confirmed)."""
        return float(np.mean(list(self.support.values()))) if self.support else 0.0

    def mask_on(self, z: int) -> torch.Tensor | None:
        logits = self.logits.get(z)
        return None if logits is None else torch.from_numpy(logits > 0)


class FeatureStore:
    """Tracker image features for every slice of one series, computed once.

    Holds, per feature level, one ``(hw, slices, channels)`` tensor; the
    sine position encodings are the same for every slice and kept once.
    Quacks like the tracker session's feature cache (``get_vision_features``).
    """

    def __init__(self, n_slices: int, device: torch.device) -> None:
        self.n_slices = n_slices
        self.device = device
        self.levels: list[torch.Tensor] | None = None
        self.pos: list[torch.Tensor] = []

    def put(self, z0: int, feats: Sequence[torch.Tensor], pos: Sequence[torch.Tensor]) -> None:
        """Store the features of slices ``z0 .. z0 + b`` (tensors ``(hw, b, c)``)."""
        if self.levels is None:
            self.levels = [torch.empty((f.shape[0], self.n_slices, f.shape[2]), dtype=f.dtype,
                                       device=self.device) for f in feats]
            self.pos = [p[:, :1].to(self.device) for p in pos]
        for level, f in zip(self.levels, feats, strict=True):
            level[:, z0:z0 + f.shape[1]] = f

    def get_vision_features(self, frame_idx: int) -> dict[str, list[torch.Tensor]]:
        if self.levels is None or not 0 <= frame_idx < self.n_slices:
            raise IndexError(f"no features for slice {frame_idx}")
        return {"vision_feats": [level[:, frame_idx:frame_idx + 1] for level in self.levels],
                "vision_pos_embeds": list(self.pos)}

    def cache_vision_features(self, frame_idx: int, features: dict) -> None:
        raise RuntimeError("slice features come only from the FeatureStore; "
                           "the tracker must not encode frames itself")

    def clear_all(self) -> None:
        """Nothing to clear per session: the store lives as long as the series."""


class SliceSession(Sam3TrackerVideoInferenceSession):
    """A tracker session over the slices of a series, fed from a :class:`FeatureStore`.

    Frames are never stored as pixels (a 300-slice CT at 1008 px would be
    3.6 GB); asking for one is a bug, so it raises.
    """

    def __init__(self, store: FeatureStore, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(video=None, inference_device=device, inference_state_device=device,
                         video_storage_device=device, dtype=dtype)
        # the store stands in for the session's own cache (same methods, see FeatureStore)
        self.cache = store  # type: ignore[assignment]
        self._n_slices = store.n_slices

    @property
    def num_frames(self) -> int:
        return self._n_slices

    def get_frame(self, frame_idx: int) -> torch.Tensor:
        raise RuntimeError(f"slice {frame_idx} has no cached features")


def resize_mask(mask: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A boolean ``(h, w)`` mask at another grid size (nearest), unchanged if it already fits."""
    if tuple(mask.shape[-2:]) == tuple(shape):
        return mask
    resized = F.interpolate(mask[None, None].float(), size=shape, mode="nearest")
    return resized[0, 0] > 0.5


def support_score(mask: torch.Tensor, detections: Sequence[Detection], min_iou: float) -> float:
    """Best score of a detection overlapping the tracked ``mask`` by at least ``min_iou``."""
    if not detections or not bool(mask.any()):
        return 0.0
    height, width = mask.shape
    dets = torch.stack([resize_mask(d.mask, (height, width)) for d in detections])
    iou = pairwise_mask_iou(mask[None], dets)[0]
    scores = torch.tensor([d.score for d in detections])
    hit = iou >= min_iou
    return float(scores[hit].max()) if bool(hit.any()) else 0.0


def next_seed(candidates: Sequence[Sequence[Detection]], tried: Sequence[Track],
              min_iou: float) -> Detection | None:
    """Best detection not already explained by an earlier track (a new instance)."""
    best: Detection | None = None
    for dets in candidates:
        for det in dets:
            if best is not None and det.score <= best.score:
                continue
            covered = False
            for track in tried:
                tracked = track.mask_on(det.z)
                if tracked is not None and bool(tracked.any()):
                    height, width = tracked.shape
                    iou = pairwise_mask_iou(resize_mask(det.mask, (height, width))[None],
                                            tracked[None])[0, 0]
                    covered = covered or float(iou) >= min_iou
            if not covered:
                best = det
    return best


StepFn = Callable[[int, bool], "np.ndarray | None"]
SupportFn = Callable[[int, torch.Tensor], float]
AnchorFn = Callable[[int], bool]
ForgetFn = Callable[[Sequence[int]], None]


def propagate(seed_z: int, seed_logits: np.ndarray, n_slices: int, step: StepFn,
              support: SupportFn, max_gap: int, *, anchor: AnchorFn | None = None,
              anchor_every: int = 0, forget: ForgetFn | None = None) -> Track:
    """Follow a structure from ``seed_z`` both ways until it ends.

    ``step(z, reverse)`` returns the tracker's mask logits on slice ``z`` or
    None when the tracker reports the object absent; ``support(z, mask)`` is
    the detector's confirmation score for that mask (0 for none). Runs of
    unconfirmed slices are kept only when a confirmed slice follows within
    ``max_gap``; a trailing run is dropped, so the structure ends where the
    detector last saw it.

    Every ``anchor_every`` slices from the seed, a confirmed slice is offered
    to ``anchor(z)``, which may make it a conditioning frame (True when it
    did), as SAM3's loop re-anchors on confident detections. The slices a pass
    stepped through but did not keep are given to ``forget`` before the next
    pass starts, so the reverse pass never draws memory from the drift past
    the organ's end.
    """
    track = Track()
    track.logits[seed_z] = seed_logits
    track.support[seed_z] = support(seed_z, torch.from_numpy(seed_logits > 0))
    for reverse in (False, True):
        pending: list[tuple[int, np.ndarray]] = []
        dropped: list[int] = []
        z = seed_z
        while True:
            z += -1 if reverse else 1
            if not 0 <= z < n_slices:
                break
            logits = step(z, reverse)
            if logits is None or not bool((logits > 0).any()):
                dropped.append(z)
                break
            score = support(z, torch.from_numpy(logits > 0))
            if score > 0.0:
                for gz, glogits in pending:
                    track.logits[gz] = glogits
                    track.support[gz] = 0.0
                pending.clear()
                track.logits[z] = logits
                track.support[z] = score
                if (anchor is not None and anchor_every > 0
                        and abs(z - seed_z) % anchor_every == 0 and anchor(z)):
                    track.anchors.append(z)
            else:
                pending.append((z, logits))
                if len(pending) > max_gap:
                    break
        if forget is not None:
            forget([gz for gz, _ in pending] + dropped)
    return track
