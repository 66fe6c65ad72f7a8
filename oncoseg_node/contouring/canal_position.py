"""Sanity flag: a SpinalCanal that does not lie behind the vertebral body.

On each slice where the canal is drawn there must be clearly more bone just
in front of its centre (patient -y) than just behind it: the vertebral body
in front, the laminae and spinous process behind. Bone is the Bones result
when one was drawn, whichever engine drew it, else HU above BONE_HU inside
the body. Directions are judged in DICOM patient coordinates (LPS: +x the
patient's left, +y posterior) from the volume's orientation, so HFS, HFP,
FFS and FFP give the same answer. Masks are :class:`MaskCrop` on the
volume's ``(z, y, x)`` grid; only a window around the canal is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from oncoseg_node.contouring.mask_crop import MaskCrop
from oncoseg_node.contouring.volume import Volume

CANAL = "SpinalCanal"

# The vertebral body in front of the canal: bone within this box of the canal's
# centre (mm ahead along patient -y, mm either side along patient x).
BONE_HU = 150.0  # trabecular and cortical bone, when no Bones result is drawn
FRONT_MM = (6.0, 40.0)
HALF_WIDTH_MM = 12.0
# Slices within this distance are pooled so that an intervertebral disc (up to
# about 12 mm in the lumbar spine, no bone) does not read as "no body in front".
Z_REACH_MM = 8.0
MIN_FRONT_MM2 = 20.0  # less bone than this in front (per slice) is none at all
FRONT_OVER_BACK = 1.5  # "substantially more" bone in front than behind
CANAL_SHARE = 0.20  # flag when more than this share of the canal's slices fail


def _patient_steps(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """Patient y and x (mm) of one step along (rows, columns) of the image plane."""
    dr, dc = volume.pixel_spacing
    along_rows, along_cols = volume.col_direction * dr, volume.row_direction * dc
    return (np.array([along_rows[1], along_cols[1]]),
            np.array([along_rows[0], along_cols[0]]))


def _window(crop: MaskCrop, z: int, rows: slice, cols: slice) -> np.ndarray:
    """The crop's plane ``z`` inside the grid window ``rows, cols`` (False outside its box)."""
    out = np.zeros((rows.stop - rows.start, cols.stop - cols.start), dtype=bool)
    zb, yb, xb = crop.box
    r0, r1 = max(rows.start, yb.start), min(rows.stop, yb.stop)
    c0, c1 = max(cols.start, xb.start), min(cols.stop, xb.stop)
    if zb.start <= z < zb.stop and r0 < r1 and c0 < c1:
        out[r0 - rows.start:r1 - rows.start, c0 - cols.start:c1 - cols.start] = \
            crop.array[z - zb.start, r0 - yb.start:r1 - yb.start, c0 - xb.start:c1 - xb.start]
    return out


@dataclass(frozen=True)
class _BoneSource:
    """Bone on a slice: the Bones result when drawn, else HU above BONE_HU in the body."""

    volume: Volume
    bones: MaskCrop | None
    body: MaskCrop | None

    def plane(self, z: int, rows: slice, cols: slice) -> np.ndarray:
        if self.bones is not None:
            return _window(self.bones, z, rows, cols)
        bone = self.volume.hu[z, rows, cols] > BONE_HU
        if self.body is not None:
            bone &= _window(self.body, z, rows, cols)
        return bone


def _front_back_mm2(source: _BoneSource, slices: np.ndarray, centre: tuple[float, float]
                    ) -> tuple[float, float]:
    """Mean bone area (mm^2 per slice) in the boxes in front of and behind ``centre``."""
    volume = source.volume
    dr, dc = volume.pixel_spacing
    reach = np.hypot(FRONT_MM[1], HALF_WIDTH_MM)
    r_c, c_c = centre
    rows = slice(max(int(r_c - reach / dr), 0), min(int(r_c + reach / dr) + 2, volume.shape[1]))
    cols = slice(max(int(c_c - reach / dc), 0), min(int(c_c + reach / dc) + 2, volume.shape[2]))
    step_y, step_x = _patient_steps(volume)
    dy = np.arange(rows.start, rows.stop)[:, None] - r_c
    dx = np.arange(cols.start, cols.stop)[None, :] - c_c
    posterior = dy * step_y[0] + dx * step_y[1]
    lateral = np.abs(dy * step_x[0] + dx * step_x[1]) <= HALF_WIDTH_MM
    front = lateral & (-posterior >= FRONT_MM[0]) & (-posterior <= FRONT_MM[1])
    back = lateral & (posterior >= FRONT_MM[0]) & (posterior <= FRONT_MM[1])
    in_front = behind = 0
    for z in slices:
        bone = source.plane(int(z), rows, cols)
        in_front += int(np.count_nonzero(bone & front))
        behind += int(np.count_nonzero(bone & back))
    pixel = dr * dc / len(slices)
    return in_front * pixel, behind * pixel


def canal_flag(volume: Volume, canal: MaskCrop, bones: MaskCrop | None = None,
               body: MaskCrop | None = None) -> str | None:
    """A message when the canal is not behind the vertebral body on > CANAL_SHARE of its slices.

    A slice fails when the bone in front of the canal's centre (slices within
    Z_REACH_MM pooled) is under MIN_FRONT_MM2, or under FRONT_OVER_BACK times
    the bone behind it.
    """
    source = _BoneSource(volume, bones, body)
    offsets = volume.slice_offsets
    z0, y0, x0 = canal.origin
    rows = np.arange(y0, y0 + canal.array.shape[1], dtype=np.float64)
    cols = np.arange(x0, x0 + canal.array.shape[2], dtype=np.float64)
    judged = failed = 0
    for k, plane in enumerate(canal.array):
        n = np.count_nonzero(plane)
        if not n:
            continue
        z = z0 + k
        centre = (float(plane.sum(axis=1) @ rows) / n, float(plane.sum(axis=0) @ cols) / n)
        near = np.flatnonzero(np.abs(offsets - offsets[z]) <= Z_REACH_MM)
        in_front, behind = _front_back_mm2(source, near, centre)
        judged += 1
        if in_front < MIN_FRONT_MM2 or in_front < FRONT_OVER_BACK * behind:
            failed += 1
    if judged and failed > CANAL_SHARE * judged:
        return f"{CANAL} not behind the vertebral body on {failed} of {judged} slices"
    return None
