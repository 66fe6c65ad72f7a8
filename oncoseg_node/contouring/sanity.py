"""Sanity flags on contoured structures: warnings for the reviewer, never a veto.

A flag says what looks wrong (volume outside the physicists' expected range,
a left-sided organ whose centre lies on the patient's right) so the QA page
and the job record point the reviewer at it. Laterality is judged in patient
coordinates (LPS: +x is the patient's left), never from image columns.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from oncoseg_node.contouring.engines.base import StructureResult
from oncoseg_node.contouring.protocols import Structure
from oncoseg_node.contouring.volume import Volume

BODY_HU = -300.0


def patient_centroid(volume: Volume, mask: np.ndarray) -> np.ndarray:
    """Centroid of a ``(z, y, x)`` mask in patient coordinates (mm, LPS).

    Each slice's pixel-to-patient map is affine, so a slice's centroid is the
    map of its mean pixel index; the slices' centroids are then weighted by
    their pixel counts. Three reductions instead of a coordinate per voxel.
    """
    per_row = mask.sum(axis=2)     # (z, y)
    per_column = mask.sum(axis=1)  # (z, x)
    counts = per_row.sum(axis=1)
    present = np.flatnonzero(counts)
    if present.size == 0:
        raise ValueError("the mask is empty")
    n = counts[present].astype(np.float64)
    rows = (per_row[present] @ np.arange(mask.shape[1], dtype=np.float64)) / n
    cols = (per_column[present] @ np.arange(mask.shape[2], dtype=np.float64)) / n
    points = volume.index_to_patient(present, rows, cols)
    return (points * n[:, None]).sum(axis=0) / n.sum()


def body_midline_x(volume: Volume, body: np.ndarray | None = None) -> float:
    """Patient x (mm) of the body's centre: the reference for left and right."""
    mask = body if body is not None and body.any() else volume.hu > BODY_HU
    if not mask.any():
        return 0.0
    return float(patient_centroid(volume, mask)[0])


def flag_results(volume: Volume, structures: list[Structure] | tuple[Structure, ...],
                 results: list[StructureResult]) -> list[StructureResult]:
    """Return the results with volume and laterality flags added."""
    by_name = {s.name: s for s in structures}
    body = next((r.mask for r in results if r.name == "External" and not r.absent), None)
    midline: float | None = None
    flagged = []
    for result in results:
        structure = by_name.get(result.name)
        if structure is None or result.absent:
            flagged.append(result)
            continue
        flags = list(result.flags)
        if structure.volume_cc is not None:
            lo, hi = structure.volume_cc
            cc = volume.mask_volume_cc(result.found_mask)
            if not lo <= cc <= hi:
                flags.append(f"volume {cc:.1f} cc outside expected {lo:g}-{hi:g} cc")
        if structure.laterality in ("left", "right"):
            if midline is None:
                midline = body_midline_x(volume, body)
            x = float(patient_centroid(volume, result.found_mask)[0])
            side = "left" if x > midline else "right"
            if side != structure.laterality:
                flags.append(f"centre lies on the patient's {side} "
                             f"({x - midline:+.1f} mm from midline)")
        flagged.append(replace(result, flags=tuple(flags)))
    return flagged
