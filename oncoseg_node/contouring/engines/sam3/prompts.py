"""Intensity-based box prompts: where a structure's Hounsfield window puts it, per slice.

CT numbers are absolute, so for structures with a distinct density (lung,
bone, air, brain inside the skull) a window on HU locates the structure well
enough to prompt a promptable model with a box: automatic prompting from
intensity, with fixed HU windows where other modalities need per-image
statistics, and no help for low-contrast organs (those get text prompts
only). Steps: in-plane mean smoothing, HU
window inside the body, opening, largest 3D component (or every component
at least ``keep_fraction`` of it; paired organs are found side by side),
then per slice the bounding box of each kept component, grown by a margin.

Coordinates: boxes are pixel indices on the volume's ``(z, y, x)`` grid,
``(row0, col0, row1, col1)`` inclusive, the form the SAM3 engine takes
(``engine.Box``); ``PixelBox.xyxy`` gives ``(x0, y0, x1, y1)``. Left and right
are the patient's (LPS: +x is the patient's left), decided per slice from
patient coordinates, so HFS, HFP, FFS and FFP all give the same organ.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from oncoseg_node.contouring.engines.classical.blocks import bbox
from oncoseg_node.contouring.engines.classical.body import external, midlines, patient_x
from oncoseg_node.contouring.engines.classical.labels import component_sizes_cc
from oncoseg_node.contouring.engines.classical.morphology import opening, radius_px
from oncoseg_node.contouring.mask_crop import whole_box
from oncoseg_node.contouring.protocols import Structure
from oncoseg_node.contouring.volume import Volume


class PixelBox(NamedTuple):
    """Inclusive pixel-index box on one slice: rows (y) then columns (x)."""

    row0: int
    col0: int
    row1: int
    col1: int

    @property
    def xyxy(self) -> tuple[int, int, int, int]:
        return (self.col0, self.row0, self.col1, self.row1)


@dataclass(frozen=True)
class PromptSpec:
    """How to find one structure by intensity."""

    window: tuple[float, float]
    smoothing_mm: float = 1.0
    opening_mm: float = 2.0
    margin_mm: float = 5.0
    keep_fraction: float = 1.0  # 1.0: the largest component only; 0.0: all of them
    paired: bool = False         # left and right organ found apart, one box each
    min_cc: float = 1.0          # a component smaller than this is not the structure
    min_area_mm2: float = 30.0   # slices where it is a sliver get no box
    inside_body: bool = True


LUNG = PromptSpec((-960.0, -400.0), min_cc=30.0)  # pure air (airways) left out
BONE = PromptSpec((200.0, 3000.0), opening_mm=0.0, margin_mm=3.0, keep_fraction=0.0)
DEFAULT_SPECS: Mapping[str, PromptSpec] = {
    "Lungs": replace(LUNG, paired=True),
    "Lung_L": LUNG,
    "Lung_R": LUNG,
    "Trachea": PromptSpec((-1000.0, -900.0), opening_mm=0.0, margin_mm=3.0, min_cc=2.0),
    "Bones": BONE,
    "Brain": PromptSpec((15.0, 60.0), smoothing_mm=2.0, opening_mm=3.0, min_cc=50.0),
}


def side_of(structure: Structure) -> str | None:
    """The patient side a structure is on: its laterality, else its TG-263 suffix."""
    if structure.laterality in ("left", "right"):
        return structure.laterality
    if structure.name.endswith("_L"):
        return "left"
    if structure.name.endswith("_R"):
        return "right"
    return None


def spec_for(structure: Structure, specs: Mapping[str, PromptSpec] = DEFAULT_SPECS
             ) -> PromptSpec | None:
    """The structure's prompt recipe; a protocol ``hu_window`` overrides the window."""
    spec = specs.get(structure.name)
    if structure.hu_window is not None:
        return replace(spec or PromptSpec(structure.hu_window), window=structure.hu_window)
    return spec


def _box_mean(hu: np.ndarray, ry: int, rx: int) -> np.ndarray:
    """In-plane mean over a (2 ry + 1) x (2 rx + 1) window; the outermost pixels are kept."""
    out = hu.astype(np.float32)
    for axis, r in ((1, ry), (2, rx)):
        if r <= 0 or out.shape[axis] <= 2 * r:
            continue
        total = out.copy()
        inner = [slice(None)] * 3
        inner[axis] = slice(r, out.shape[axis] - r)
        for k in range(1, r + 1):  # smoothing radii are a pixel or two: direct sums
            lo, hi = [slice(None)] * 3, [slice(None)] * 3
            lo[axis], hi[axis] = slice(r - k, out.shape[axis] - r - k), \
                slice(r + k, out.shape[axis] - r + k)
            total[tuple(inner)] += out[tuple(lo)] + out[tuple(hi)]
        total[tuple(inner)] /= 2 * r + 1
        out = total
    return out


def region(volume: Volume, spec: PromptSpec, side: str | None = None,
           body: np.ndarray | None = None, mid: np.ndarray | None = None
           ) -> tuple[np.ndarray, tuple[slice, ...] | None]:
    """Labelled kept components (1..n, on the returned box) for ``spec``; box None if none.

    ``body`` (External) and ``mid`` (its midline per slice) are computed when
    not given.
    """
    if spec.inside_body:
        body = external(volume) if body is None else body
        box = bbox(body, pad=1)
    else:
        box = whole_box(volume.shape)
    if box is None:
        return np.zeros((0, 0, 0), dtype=np.int32), None
    hu = _box_mean(volume.hu[box], *radius_px(volume, spec.smoothing_mm))
    mask = (hu >= spec.window[0]) & (hu <= spec.window[1])
    if spec.inside_body and body is not None:
        mask &= body[box]
    if side is not None:
        if mid is None:
            mid = midlines(volume, body) if body is not None else np.zeros(volume.shape[0])
        x = patient_x(volume, box) - np.nan_to_num(mid[box[0]])[:, None, None]
        mask &= (x > 0) if side == "left" else (x < 0)
    ry, rx = radius_px(volume, spec.opening_mm)
    if ry or rx:
        mask = opening(mask, ry, rx)
    labels, count = ndimage.label(mask)
    if count == 0:
        return labels, None
    sizes = component_sizes_cc(volume, labels, count, box[0].start)
    keep = (sizes >= spec.min_cc) & (sizes >= spec.keep_fraction * sizes.max())
    renumber = np.zeros(count + 1, dtype=labels.dtype)
    renumber[1:][keep] = np.arange(1, int(keep.sum()) + 1)
    return renumber[labels], box


def boxes_from_labels(volume: Volume, labels: np.ndarray, box: tuple[slice, ...],
                      margin_mm: float = 0.0, min_area_mm2: float = 0.0
                      ) -> dict[int, list[PixelBox]]:
    """Per slice, one box per labelled 3D object, grown by a margin and clipped.

    ``labels`` lies on ``box`` of the volume. An object cut into islands on a
    slice (a lung around the heart, an anterior lobe) still gets one box
    there: one prompt per object.
    """
    my, mx = radius_px(volume, margin_mm)
    rows, cols = volume.shape[1:]
    min_px = min_area_mm2 / (volume.pixel_spacing[0] * volume.pixel_spacing[1])
    z0, r0, c0 = (s.start for s in box)
    out: dict[int, list[PixelBox]] = {}
    for label, found in enumerate(ndimage.find_objects(labels), start=1):
        if found is None:
            continue
        obj = labels[found] == label
        on_rows, on_cols = obj.any(axis=2), obj.any(axis=1)
        area = obj.sum(axis=(1, 2))
        for k in np.flatnonzero(area >= max(min_px, 1)):
            rs, cs = np.flatnonzero(on_rows[k]), np.flatnonzero(on_cols[k])
            top, left = r0 + found[1].start, c0 + found[2].start
            out.setdefault(z0 + found[0].start + int(k), []).append(PixelBox(
                max(top + int(rs[0]) - my, 0), max(left + int(cs[0]) - mx, 0),
                min(top + int(rs[-1]) + my, rows - 1), min(left + int(cs[-1]) + mx, cols - 1)))
    return out


def boxes_from_mask(volume: Volume, mask: np.ndarray, margin_mm: float = 0.0,
                    min_area_mm2: float = 0.0) -> dict[int, list[PixelBox]]:
    """Per slice, one box per 3D connected object of ``mask`` (``(z, y, x)``)."""
    labels, _ = ndimage.label(mask)
    return boxes_from_labels(volume, labels, tuple(slice(0, n) for n in mask.shape),
                             margin_mm, min_area_mm2)


def intensity_boxes(volume: Volume, structure: Structure, spec: PromptSpec | None = None,
                    body: np.ndarray | None = None, mid: np.ndarray | None = None
                    ) -> dict[int, list[PixelBox]]:
    """Slice index -> boxes for ``structure``; empty when it has no recipe or is not found."""
    spec = spec or spec_for(structure)
    if spec is None:
        return {}
    out: dict[int, list[PixelBox]] = {}
    # A paired organ's halves can touch (lungs at the anterior junction): find each apart.
    for side in ("left", "right") if spec.paired else (side_of(structure),):
        labels, box = region(volume, spec, side, body, mid)
        if box is None:
            continue
        found = boxes_from_labels(volume, labels, box, spec.margin_mm, spec.min_area_mm2)
        for z, boxes in found.items():
            out.setdefault(z, []).extend(boxes)
    return out


class IntensityBoxPrompter:
    """An ``engine.BoxPrompter``: slice -> boxes for a structure, or None for text only.

    By default only structures whose protocol entry sets ``hu_window`` get
    boxes: the physicist opts in per structure. With ``defaults=True`` the
    built-in recipes (lungs, trachea, bones, brain) apply without one. The
    body outline is computed once per volume and dropped with the volume.
    """

    def __init__(self, specs: Mapping[str, PromptSpec] | None = None,
                 defaults: bool = False) -> None:
        self.specs = dict(DEFAULT_SPECS if specs is None else specs)
        self.defaults = defaults
        self._bodies: weakref.WeakKeyDictionary[Volume, tuple[np.ndarray, np.ndarray]] = \
            weakref.WeakKeyDictionary()

    def __call__(self, volume: Volume, structure: Structure) -> dict[int, list[PixelBox]] | None:
        if structure.hu_window is None and not self.defaults:
            return None
        spec = spec_for(structure, self.specs)
        if spec is None:
            return None
        if volume not in self._bodies:
            body = external(volume)
            self._bodies[volume] = (body, midlines(volume, body))
        body, mid = self._bodies[volume]
        return intensity_boxes(volume, structure, spec, body, mid) or None


# What the engine registry hands the SAM3 engine.
box_prompts = IntensityBoxPrompter()
