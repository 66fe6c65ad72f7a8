"""The weight-free CT engine: structures that CT physics alone defines well.

External (body outline without couch, immobilisation or air), Lung_L,
Lung_R and Lungs (trachea and main bronchi excluded), Trachea and Bronchus,
Bones and SpinalCanal, from Hounsfield thresholds and morphology on
numpy/scipy. Masks are ``(z, y, x)`` on the volume's grid. Left and right
are decided in patient coordinates (LPS: +x is the patient's left) through
each slice's own geometry, and the couch side from PatientPosition, so HFS,
HFP, FFS and FFP series all come out right. The steps live in ``ct_body``,
``ct_lungs``, ``ct_bones`` and ``ct_canal``; this module runs each once.

Each step works inside the bounding box of what it looks at, so a pelvis
costs nothing for lungs and a 150-slice 512x512 thorax takes a few seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property

import numpy as np
from scipy import ndimage

from oncoseg_node.contouring.engines.base import StructureResult
from oncoseg_node.contouring.engines.ct_body import BODY_HU, external, midlines, patient_x
from oncoseg_node.contouring.engines.ct_lungs import (
    GAS_HU,
    LUNG_HU,
    MIN_LUNG_CC,
    LungsAndAirways,
    lungs,
)
from oncoseg_node.contouring.engines.postprocess import (
    IN_PLANE,
    bbox,
    fill_holes,
    postprocess,
    radius_px,
)
from oncoseg_node.contouring.protocols import Structure
from oncoseg_node.contouring.volume import Volume

__all__ = ["BODY_HU", "GAS_HU", "LUNG_HU", "MIN_LUNG_CC", "ClassicalEngine", "bones_and_canal",
           "external", "lungs", "midlines", "patient_x"]

BONE_HU = 180.0        # above any unenhanced soft tissue, below cancellous bone
SOFT_HU = 40.0         # what bone borders; its edge lies half way to the bone's peak
PEAK_MM = 2.0
MARROW_HU = 100.0      # a hole in the bone mask denser than this is marrow, not canal
CANAL_HU = (-50.0, 100.0)
CANAL_MM2 = (50.0, 600.0)  # a spinal canal's cross-section is 0.5 to 6 cm^2
CANAL_GAP_MM = 20.0    # discs open the bony ring; bridge gaps up to this long


def bones_and_canal(volume: Volume, body: np.ndarray, mid: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Skeleton (marrow included) and the spinal canal it encloses."""
    bones = np.zeros(volume.shape, dtype=bool)
    canal = np.zeros(volume.shape, dtype=bool)
    box = bbox((volume.hu > BONE_HU) & body, pad=1)
    if box is None:
        return bones, canal
    hu = volume.hu[box]
    # Edges at half maximum: a voxel is bone only if it is denser than half way
    # between soft tissue and the densest bone within 2 mm. A fixed threshold
    # would put a dense cortex's blurred edge too far out and close the canal.
    peak = _local_max(hu, *radius_px(volume, PEAK_MM))
    bone = (hu > BONE_HU) & (hu > (peak + SOFT_HU) / 2) & body[box]
    holes = _Holes(bone, hu)
    if holes.count:
        bone |= np.concatenate([[False], holes.mean_hu > MARROW_HU])[holes.labels]
        canal[box] = _canal(volume, holes, box, mid)
    bones[box] = bone
    return bones, canal


class _Holes:
    """Background enclosed by bone on a slice, with per-hole statistics.

    Statistics come from the few hole voxels only (bincount on their flat
    indices), never from passes over the whole box.
    """

    def __init__(self, bone: np.ndarray, hu: np.ndarray) -> None:
        self.labels, self.count = ndimage.label(fill_holes(bone) & ~bone, structure=IN_PLANE)
        self.flat = np.flatnonzero(self.labels)
        lab = self.labels.ravel()[self.flat]
        values = hu.ravel()[self.flat]
        n = self.count + 1
        self.size = np.bincount(lab, minlength=n)[1:]
        # Judge a hole by its inside: the ring next to bone is blurred toward bone.
        # Holes never touch a slice edge, so the four neighbours are in the slice.
        b, cols = bone.ravel(), bone.shape[2]
        inside = ~(b[self.flat - 1] | b[self.flat + 1] | b[self.flat - cols]
                   | b[self.flat + cols])
        n_in = np.bincount(lab[inside], minlength=n)[1:]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_all = np.bincount(lab, weights=values, minlength=n)[1:] / self.size
            mean_in = np.bincount(lab[inside], weights=values[inside], minlength=n)[1:] / n_in
        self.mean_hu = np.where(n_in > 0, mean_in, mean_all)

    def centres(self) -> np.ndarray:
        """(count, 3) mean (z, row, col) index of each hole."""
        lab = self.labels.ravel()[self.flat]
        idx = np.unravel_index(self.flat, self.labels.shape)
        n = self.count + 1
        return np.stack([np.bincount(lab, weights=i, minlength=n)[1:] for i in idx],
                        axis=1) / self.size[:, None]


def _local_max(hu: np.ndarray, ry: int, rx: int) -> np.ndarray:
    out = hu.copy()
    for axis, radius in ((1, max(ry, 1)), (2, max(rx, 1))):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        for _ in range(radius):
            np.maximum(out[tuple(hi)], out[tuple(lo)], out=out[tuple(hi)])
        for _ in range(radius):
            np.maximum(out[tuple(lo)], out[tuple(hi)], out=out[tuple(lo)])
    return out


def _canal(volume: Volume, holes: _Holes, box: tuple[slice, ...], mid: np.ndarray
           ) -> np.ndarray:
    """Per slice, the soft-tissue hole in bone nearest the midline; short gaps bridged."""
    area = holes.size * volume.pixel_spacing[0] * volume.pixel_spacing[1]
    ok = (holes.mean_hu >= CANAL_HU[0]) & (holes.mean_hu <= CANAL_HU[1]) \
        & (area >= CANAL_MM2[0]) & (area <= CANAL_MM2[1])
    out = np.zeros(holes.labels.shape, dtype=bool)
    if not ok.any():
        return out
    chosen: dict[int, tuple[float, int]] = {}
    centres = holes.centres()
    for label in np.flatnonzero(ok) + 1:
        zf, rf, cf = centres[label - 1]
        z = int(round(zf))
        point = volume.index_to_patient(box[0].start + z, np.array([rf + box[1].start]),
                                        np.array([cf + box[2].start]))[0]
        off_midline = abs(point[0] - mid[box[0].start + z])
        if off_midline <= 30.0 and (z not in chosen or off_midline < chosen[z][0]):
            chosen[z] = (off_midline, int(label))
    for z, (_, chosen_label) in chosen.items():
        out[z] = holes.labels[z] == chosen_label
    found = sorted(chosen)
    offsets = volume.slice_offsets[box[0]]
    for prev, nxt in zip(found, found[1:], strict=False):
        if nxt - prev > 1 and offsets[nxt] - offsets[prev] <= CANAL_GAP_MM:
            for z in range(prev + 1, nxt):
                near = prev if offsets[z] - offsets[prev] <= offsets[nxt] - offsets[z] else nxt
                # The ring is open here (a disc): carry the neighbour's canal over soft tissue.
                hu = volume.hu[box[0].start + z, box[1], box[2]]
                out[z] = out[near] & (hu >= CANAL_HU[0] - 100) & (hu <= CANAL_HU[1] + 100)
    return out


class _Steps:
    """Each step at most once per volume, and only when a structure needs it."""

    def __init__(self, volume: Volume) -> None:
        self.volume = volume

    @cached_property
    def body(self) -> np.ndarray:
        return external(self.volume)

    @cached_property
    def mid(self) -> np.ndarray:
        return midlines(self.volume, self.body)

    @cached_property
    def chest(self) -> LungsAndAirways:
        return LungsAndAirways(self.volume, self.body, self.mid)

    @cached_property
    def skeleton(self) -> tuple[np.ndarray, np.ndarray]:
        return bones_and_canal(self.volume, self.body, self.mid)


class ClassicalEngine:
    """Engine protocol implementation with no model weights."""

    name = "classical"
    SUPPORTED = ("External", "Lung_L", "Lung_R", "Lungs", "Trachea", "Bronchus", "Bones",
                 "SpinalCanal")

    @property
    def description(self) -> str:
        return "classical CT thresholds and morphology (no model weights)"

    def supports(self, structure: Structure) -> bool:
        return structure.name in self.SUPPORTED

    def segment(self, volume: Volume, structures: Sequence[Structure]) -> list[StructureResult]:
        steps = _Steps(volume)
        builders: dict[str, Callable[[], np.ndarray]] = {
            "External": lambda: steps.body,
            "Lung_L": lambda: steps.chest.left,
            "Lung_R": lambda: steps.chest.right,
            "Lungs": lambda: steps.chest.left | steps.chest.right,
            "Trachea": lambda: steps.chest.trachea,
            "Bronchus": lambda: steps.chest.bronchus,
            "Bones": lambda: steps.skeleton[0],
            "SpinalCanal": lambda: steps.skeleton[1],
        }
        results = []
        for structure in structures:
            if structure.name not in builders:
                results.append(StructureResult(structure.name, None,
                                               note="not supported by the classical engine"))
                continue
            mask = postprocess(volume, builders[structure.name](), structure.postprocess)
            if not mask.any():
                results.append(StructureResult(structure.name, None,
                                               note="not found in this series"))
                continue
            results.append(StructureResult(structure.name, mask))
        return results
