"""Intensity-based box prompts: where a structure's HU window says it is, slice by slice.

For a structure with ``hu_window`` in its protocol entry, the CT is smoothed,
thresholded to that window inside the body outline, opened to cut thin bridges, restricted to the
patient's side for lateral structures (LPS: +x is the patient's left) and
reduced to its largest 3D component; each slice's bounding box, grown by a
margin, becomes a geometric prompt the SAM3 engine gives beside the text.
Boxes are CT pixel indices ``(row0, col0, row1, col1)``, inclusive.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..protocols import Structure
from ..volume import Volume
from .classical import external

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class PromptSettings:
    smoothing_mm: float = 1.0
    opening_mm: float = 2.0
    margin_mm: float = 5.0
    min_slice_area_mm2: float = 20.0


DEFAULT_SETTINGS = PromptSettings()


def _side_mask(volume: Volume, side: str) -> np.ndarray:
    """(y, x) per slice: pixel centres on the patient's ``side`` of the body centre."""
    body = volume.hu > -350
    rows, cols = volume.shape[1:]
    ys, xs = np.mgrid[0:rows, 0:cols]
    out = np.zeros(volume.shape, dtype=bool)
    for z in range(volume.shape[0]):
        if not body[z].any():
            continue
        by, bx = np.nonzero(body[z])
        centre = volume.index_to_patient(z, np.array([by.mean()]), np.array([bx.mean()]))[0, 0]
        px = volume.index_to_patient(z, ys.ravel(), xs.ravel())[:, 0].reshape(rows, cols)
        out[z] = px > centre if side == "left" else px < centre
    return out


def intensity_mask(volume: Volume, window: tuple[float, float], laterality: str | None = None,
                   settings: PromptSettings = DEFAULT_SETTINGS) -> np.ndarray:
    """The largest 3D region inside the HU window, after smoothing and opening."""
    sigma = (0.0, settings.smoothing_mm / volume.pixel_spacing[0],
             settings.smoothing_mm / volume.pixel_spacing[1])
    smooth = ndimage.gaussian_filter(volume.hu, sigma) if settings.smoothing_mm else volume.hu
    # Inside the body only: couch foam and room air share many organs' windows.
    mask = (smooth >= window[0]) & (smooth <= window[1]) & external(volume)
    radius = int(round(settings.opening_mm / min(volume.pixel_spacing)))
    if radius:
        mask = ndimage.binary_opening(mask, structure=np.ones((1, 2 * radius + 1, 2 * radius + 1),
                                                              dtype=bool))
    if laterality in ("left", "right"):
        mask &= _side_mask(volume, laterality)
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def box_prompts(volume: Volume, structure: Structure,
                settings: PromptSettings = DEFAULT_SETTINGS) -> dict[int, list[Box]] | None:
    """Per-slice boxes for ``structure``; None when it has no HU window (text only)."""
    if structure.hu_window is None:
        return None
    mask = intensity_mask(volume, structure.hu_window, structure.laterality, settings)
    rows, cols = volume.shape[1:]
    margin_r = settings.margin_mm / volume.pixel_spacing[0]
    margin_c = settings.margin_mm / volume.pixel_spacing[1]
    min_pixels = settings.min_slice_area_mm2 / (volume.pixel_spacing[0] * volume.pixel_spacing[1])
    boxes: dict[int, list[Box]] = {}
    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        ys, xs = np.nonzero(mask[z])
        if len(ys) < min_pixels:
            continue
        boxes[int(z)] = [(max(ys.min() - margin_r, 0.0), max(xs.min() - margin_c, 0.0),
                          min(ys.max() + margin_r, rows - 1.0), min(xs.max() + margin_c,
                                                                     cols - 1.0))]
    return boxes
