"""Sanity flags on contoured structures: warnings for the reviewer, never a veto.

A flag says what looks wrong (volume outside the physicists' expected range,
a left-sided organ whose centre lies on the patient's right, anatomy that
cannot be: a SpinalCanal in front of the vertebral body, a contrast-filled
vessel inside Bones) so the QA page, the job record and the structure set's
description point the reviewer at it. Laterality and front/back are judged
in patient coordinates (LPS: +x is the patient's left, +y posterior), never
from image rows and columns. The anatomy checks read only the final masks
and the HU, so they hold whichever engine drew the structures.
"""

from __future__ import annotations

import numpy as np

from oncoseg_node.contouring.bone_tubes import BONES, tube_flag
from oncoseg_node.contouring.canal_position import CANAL, canal_flag
from oncoseg_node.contouring.engines.base import StructureResult
from oncoseg_node.contouring.engines.classical.body import BODY_HU
from oncoseg_node.contouring.mask_crop import MaskCrop
from oncoseg_node.contouring.protocols import Structure
from oncoseg_node.contouring.volume import Volume

BODY = "External"


def patient_centroid(volume: Volume, mask: MaskCrop) -> np.ndarray:
    """Centroid of a mask in patient coordinates (mm, LPS), read from its crop.

    Each slice's pixel-to-patient map is affine, so a slice's centroid is the
    map of its mean pixel index; the slices' centroids are then weighted by
    their pixel counts. Three reductions over the crop instead of a
    coordinate per voxel; indices are shifted by the crop's origin.
    """
    array = mask.array
    per_row = array.sum(axis=2)     # (z, y)
    per_column = array.sum(axis=1)  # (z, x)
    counts = per_row.sum(axis=1)
    present = np.flatnonzero(counts)
    if present.size == 0:
        raise ValueError("the mask is empty")
    z0, y0, x0 = mask.origin
    n = counts[present].astype(np.float64)
    rows = (per_row[present] @ np.arange(y0, y0 + array.shape[1], dtype=np.float64)) / n
    cols = (per_column[present] @ np.arange(x0, x0 + array.shape[2], dtype=np.float64)) / n
    points = volume.index_to_patient(present + z0, rows, cols)
    return (points * n[:, None]).sum(axis=0) / n.sum()


def crop_volume_cc(volume: Volume, mask: MaskCrop) -> float:
    """Volume of a mask in cubic centimetres, each slice with its own thickness."""
    z = mask.box[0]
    per_slice = mask.array.reshape(mask.array.shape[0], -1).sum(axis=1)
    return float((per_slice * volume.voxel_volume_mm3[z]).sum() / 1000.0)


def body_midline_x(volume: Volume, body: MaskCrop | None = None) -> float:
    """Patient x (mm) of the body's centre: the reference for left and right."""
    mask = body if body is not None and not body.empty else MaskCrop.of(volume.hu > BODY_HU)
    if mask.empty:
        return 0.0
    return float(patient_centroid(volume, mask)[0])


def anatomy_flags(volume: Volume, results: list[StructureResult]) -> dict[str, list[str]]:
    """Flags for impossible anatomy, by structure name: the canal's place, vessels in Bones."""
    found = {r.name: r.found_crop for r in results if not r.absent}
    flags: dict[str, list[str]] = {}
    if CANAL in found:
        message = canal_flag(volume, found[CANAL], found.get(BONES), found.get(BODY))
        if message:
            flags[CANAL] = [message]
    if BONES in found:
        message = tube_flag(volume, found[BONES])
        if message:
            flags[BONES] = [message]
    return flags


def flag_results(volume: Volume, structures: list[Structure] | tuple[Structure, ...],
                 results: list[StructureResult]) -> list[StructureResult]:
    """Return the results with volume, laterality and anatomy flags added."""
    by_name = {s.name: s for s in structures}
    body = next((r.crop for r in results if r.name == BODY and not r.absent), None)
    anatomy = anatomy_flags(volume, results)
    midline: float | None = None
    flagged = []
    for result in results:
        structure = by_name.get(result.name)
        if structure is None or result.absent:
            extra = tuple(anatomy.pop(result.name, ()))
            flagged.append(result.with_flags(result.flags + extra) if extra else result)
            continue
        flags = list(result.flags) + anatomy.pop(result.name, [])
        if structure.volume_cc is not None:
            lo, hi = structure.volume_cc
            cc = crop_volume_cc(volume, result.found_crop)
            if not lo <= cc <= hi:
                flags.append(f"volume {cc:.1f} cc outside expected {lo:g}-{hi:g} cc")
        if structure.laterality in ("left", "right"):
            if midline is None:
                midline = body_midline_x(volume, body)
            x = float(patient_centroid(volume, result.found_crop)[0])
            side = "left" if x > midline else "right"
            if side != structure.laterality:
                flags.append(f"centre lies on the patient's {side} "
                             f"({x - midline:+.1f} mm from midline)")
        flagged.append(result.with_flags(tuple(flags)))
    return flagged
