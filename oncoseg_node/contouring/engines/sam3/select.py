"""Which of SAM3's detections on each slice are instances of one structure.

Detections of the structure's concepts are merged per slice (mask NMS), those
a negative concept outranks are dropped, and for a sided structure only the
instances on the patient's side are kept. The side is decided in patient
coordinates (DICOM LPS: +x is the patient's left) from the mask centroid and
the body midline, never from the image or the concept's wording: SAM3 learned
"left" as image-left, which is the patient's right in a supine scan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from oncoseg_node.contouring.engines.sam3.nms import mask_nms, pairwise_mask_iou
from oncoseg_node.contouring.engines.sam3.preprocess import SliceFrame, mask_centroid_index
from oncoseg_node.contouring.engines.sam3.track import Detection
from oncoseg_node.contouring.protocols import Structure
from oncoseg_node.contouring.volume import Volume

NEGATIVE_IOU = 0.5  # a negative concept's detection this close to ours outranks it
# SAM3's detector always reads a text slot beside the geometry. For boxes alone,
# Meta's processor and transformers' fill it with this word ("visual"), so that
# the model relies on the boxes only; no concept of the structure is sent.
BOXES_ONLY_TEXT = "visual"
PromptKey = tuple[str, str | None]  # (text sent, structure name when boxes make it specific)
Hits = Mapping[PromptKey, Sequence[Sequence[Detection]]]


def concepts(structure: Structure) -> list[str]:
    return [c for c in structure.concepts if c.strip()]


def prompt_keys(structure: Structure, boxed: bool) -> list[PromptKey]:
    """The detector prompts whose detections are the structure's.

    ``boxed``: the structure has box prompts on some slices. A ``prompt:
    boxes`` structure has one prompt, its boxes, keyed by its name.
    """
    if structure.prompting == "boxes":
        return [(BOXES_ONLY_TEXT, structure.name)]
    return [(c, structure.name if boxed else None) for c in concepts(structure)]


def negative_concepts(structure: Structure) -> list[str]:
    """Concepts whose detections outrank the structure's; none when no text is sent."""
    if structure.prompting == "boxes":
        return []
    return [c for c in structure.negative_concepts if c.strip()]


def patient_side(volume: Volume, frame: SliceFrame, det: Detection,
                 midline: float) -> str | None:
    """``left`` or ``right`` of the patient for a detection's centroid; None for an empty mask."""
    centre = mask_centroid_index(frame, det.mask)
    if centre is None:
        return None
    x = volume.index_to_patient(det.z, np.array([centre[0]]), np.array([centre[1]]))[0, 0]
    return "left" if x > midline else "right"  # LPS: +x is the patient's left


def instances(volume: Volume, frame: SliceFrame, structure: Structure, hits: Hits, *,
              boxed: bool, midline: float, nms_iou: float,
              max_instances: int) -> list[list[Detection]]:
    """Per slice: the structure's instances after merging, negatives and laterality."""
    out: list[list[Detection]] = []
    for z in range(volume.shape[0]):
        dets = [d for key in prompt_keys(structure, boxed) for d in hits[key][z]]
        if len(dets) > 1:
            keep = mask_nms(torch.stack([d.mask for d in dets]),
                            torch.tensor([d.score for d in dets]), nms_iou,
                            max_keep=max_instances, max_candidates=len(dets))
            dets = [dets[k] for k in keep.tolist()]
        negatives = [d for c in negative_concepts(structure) for d in hits[(c, None)][z]]
        if negatives and dets:
            iou = pairwise_mask_iou(torch.stack([d.mask for d in dets]),
                                    torch.stack([d.mask for d in negatives]))
            dets = [d for i, d in enumerate(dets)
                    if not any(float(iou[i, j]) >= NEGATIVE_IOU and neg.score > d.score
                               for j, neg in enumerate(negatives))]
        if structure.laterality in ("left", "right"):
            dets = [d for d in dets
                    if patient_side(volume, frame, d, midline) == structure.laterality]
        out.append(dets)
    return out
