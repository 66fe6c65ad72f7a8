"""The body outline (External) and where the patient's midline runs.

External is the body without couch, mattress, immobilisation or air. The
couch side comes from PatientPosition (supine: posterior, prone: anterior),
so HFS, HFP, FFS and FFP series all come out right. Masks are ``(z, y, x)``
on the volume's grid; patient coordinates are DICOM LPS (+x: patient's left).
"""

from __future__ import annotations

import numpy as np

from oncoseg_node.contouring.engines.postprocess import (
    bbox,
    compact_label,
    dilate,
    fill_holes,
    opening,
    radius_px,
    voxel_counts,
)
from oncoseg_node.contouring.volume import Volume

# HU levels are integers: int16 HU compare with them in 16-bit arithmetic.
BODY_HU = -350         # skin/air edge; couch foam, headrests and vacuum bags stay below
OPEN_MM = 3.0          # thinner than 2x this (masks, straps, cables) is not patient
COUCH_STEP_MM = 30.0   # a couch top is this much wider than the body just above it
MIN_BODY_FRACTION = 0.05  # body parts smaller than this share of the largest are devices
SUPINE, PRONE = frozenset({"HFS", "FFS"}), frozenset({"HFP", "FFP"})


def _couch_rows(volume: Volume, candidate: np.ndarray) -> slice | None:
    """Image rows at and beyond the couch top, or None when no couch is found.

    The couch is on the patient's posterior side when supine and anterior
    when prone: a plate wider than the body on it, the same on every slice.
    Following the lateral extent of dense material row by row (median over
    slices) from the body's middle toward the couch, the extent shrinks with
    the body's curve and jumps at the couch top, whether or not the patient
    touches it. Opening cannot do this: a plate pressed flat against the
    skin survives any opening.
    """
    col_y = float(volume.col_direction[1])
    if volume.patient_position not in SUPINE | PRONE or abs(col_y) < 0.5:
        return None  # decubitus or an oblique image: leave it to the opening
    down = int(np.sign(col_y)) * (1 if volume.patient_position in SUPINE else -1)
    any_row = candidate.any(axis=2)
    per_row = any_row.sum(axis=0)
    if not per_row.any():
        return None
    first = np.argmax(candidate, axis=2)
    last = candidate.shape[2] - np.argmax(candidate[:, :, ::-1], axis=2)
    extent = np.median((last - first) * any_row, axis=0) * volume.pixel_spacing[1]
    middle = int(np.searchsorted(np.cumsum(per_row), per_row.sum() / 2))
    widest = extent[middle]
    stop = len(extent) if down > 0 else -1
    for r in range(middle + 2 * down, stop, down):
        before = min(extent[r - down], extent[r - 2 * down])
        if extent[r] - before >= COUCH_STEP_MM and extent[r] > widest:
            return slice(r, None) if down > 0 else slice(0, r + 1)
        widest = max(widest, extent[r])
    return None


def external(volume: Volume) -> np.ndarray:
    """Body outline: couch cut, thin devices opened away, main parts kept, holes filled."""
    candidate = volume.hu > BODY_HU
    couch = _couch_rows(volume, candidate)
    if couch is not None:
        candidate[:, couch, :] = False
    box = bbox(candidate, pad=2)
    body = np.zeros(volume.shape, dtype=bool)
    if box is None:
        return body
    cand = candidate[box]
    ry, rx = radius_px(volume, OPEN_MM)
    core = opening(cand, ry, rx) if ry or rx else cand
    labels, count = compact_label(core)
    if count == 0:
        return body
    sizes = voxel_counts(labels, count)[1:]
    keep = np.concatenate([[False], sizes >= MIN_BODY_FRACTION * sizes.max()])
    core = keep[labels]
    del labels
    # Give back the skin detail the opening shaved off, not what lies beyond it.
    grown = dilate(core, ry, rx)
    grown &= cand
    grown |= core
    del core
    fill_holes(grown, out=grown)
    body[box] = grown
    return body


def patient_x(volume: Volume, box: tuple[slice, ...]) -> np.ndarray:
    """Patient x (mm) of the voxel centres in ``box``, broadcastable to its shape."""
    x = (volume.positions[box[0], 0][:, None, None]
         + volume.pixel_spacing[1] * volume.row_direction[0]
         * np.arange(box[2].start, box[2].stop)[None, None, :])
    if volume.col_direction[0] != 0:  # only oblique images: keep axial cases (z, 1, x)
        x = x + (volume.pixel_spacing[0] * volume.col_direction[0]
                 * np.arange(box[1].start, box[1].stop)[None, :, None])
    return x


def midlines(volume: Volume, body: np.ndarray) -> np.ndarray:
    """Mean patient x (mm) of the body on each slice; NaN where there is none."""
    count = body.sum(axis=(1, 2)).astype(float)
    rows = body.sum(axis=2) @ np.arange(body.shape[1])
    cols = body.sum(axis=1) @ np.arange(body.shape[2])
    with np.errstate(invalid="ignore", divide="ignore"):
        return (volume.positions[:, 0]
                + volume.pixel_spacing[0] * volume.col_direction[0] * rows / count
                + volume.pixel_spacing[1] * volume.row_direction[0] * cols / count)


