"""The weight-free CT engine: structures that CT physics alone defines well.

External (body outline without couch, immobilisation or air), Lung_L,
Lung_R and Lungs (airways excluded), Bones and SpinalCanal, from Hounsfield
thresholds and morphology on numpy/scipy. Left and right are decided in
patient coordinates (LPS: +x is the patient's left), so HFS, HFP, FFS and
FFP series all come out right. Masks are ``(z, y, x)`` on the volume's grid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

from ..protocols import Structure
from ..volume import Volume
from .base import StructureResult
from .postprocess import postprocess

BODY_HU = -350.0        # skin/air boundary; couch foam and air stay below
LUNG_HU = -400.0        # aerated lung parenchyma is below this
AIRWAY_HU = -950.0      # air in trachea and bronchi; parenchyma stays above
BONE_HU = 200.0
MIN_LUNG_CC = 30.0      # smaller air pockets (bowel gas, oesophagus) are not lung
MIN_BONE_CC = 0.05
COUCH_OPENING_MM = 6.0  # thin shells (couch, mask frames) vanish under this opening


def _disk(radius_px: int) -> np.ndarray:
    r = max(int(radius_px), 1)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (xx * xx + yy * yy) <= r * r


def _largest_component_2d(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def external(volume: Volume) -> np.ndarray:
    """Body outline: largest opened component per slice, holes filled."""
    radius = int(round(COUCH_OPENING_MM / 2 / min(volume.pixel_spacing)))
    footprint = _disk(radius)
    body = np.zeros(volume.shape, dtype=bool)
    for z in range(volume.shape[0]):
        candidate = volume.hu[z] > BODY_HU
        if not candidate.any():
            continue
        opened = ndimage.binary_opening(candidate, structure=footprint)
        core = _largest_component_2d(opened)
        if not core.any():
            continue
        # Give back the skin the opening shaved off, but not the couch:
        # only thresholded pixels next to the kept core.
        grown = ndimage.binary_dilation(core, structure=footprint) & candidate
        body[z] = ndimage.binary_fill_holes(_largest_component_2d(grown | core))
    return body


def _airways(volume: Volume, body: np.ndarray) -> np.ndarray:
    """Trachea and main bronchi: air inside the body that is not parenchyma."""
    air = (volume.hu < AIRWAY_HU) & body
    return ndimage.binary_dilation(air, iterations=1) & body


def lungs(volume: Volume, body: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(left, right) lungs in the patient's sense; empty when no lung is in view."""
    aerated = (volume.hu < LUNG_HU) & body & ~_airways(volume, body)
    aerated = ndimage.binary_opening(aerated, iterations=1)
    labels, count = ndimage.label(aerated)
    empty = np.zeros(volume.shape, dtype=bool)
    if count == 0:
        return empty, empty.copy()
    voxel_cc = volume.voxel_volume_mm3 / 1000.0
    sizes = ndimage.sum_labels(np.ones(volume.shape) * voxel_cc[:, None, None], labels,
                               index=np.arange(1, count + 1))
    keep = [i + 1 for i in np.argsort(sizes)[::-1][:2] if sizes[i] >= MIN_LUNG_CC]
    if not keep:
        return empty, empty.copy()
    midline = _patient_x_midline(volume, body)
    left, right = empty.copy(), empty.copy()
    for label in keep:
        component = labels == label
        side = _patient_x(volume, component)
        if len(keep) == 1:
            # Both lungs joined (or one lung only): split at the body's midline.
            on_left = _patient_left_of(volume, midline)
            left |= component & on_left
            right |= component & ~on_left
        elif side > midline:
            left |= component
        else:
            right |= component
    return _drop_small(volume, left), _drop_small(volume, right)


def _drop_small(volume: Volume, mask: np.ndarray) -> np.ndarray:
    return mask if volume.mask_volume_cc(mask) >= MIN_LUNG_CC else np.zeros_like(mask)


def _patient_x(volume: Volume, mask: np.ndarray) -> float:
    """Mean patient x (mm) of a mask, evaluated per slice with its own geometry."""
    total, count = 0.0, 0
    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        ys, xs = np.nonzero(mask[z])
        total += float(volume.index_to_patient(int(z), ys, xs)[:, 0].sum())
        count += len(xs)
    return total / max(count, 1)


def _patient_x_midline(volume: Volume, body: np.ndarray) -> float:
    return _patient_x(volume, body) if body.any() else 0.0


def _patient_left_of(volume: Volume, midline: float) -> np.ndarray:
    """Boolean (z, y, x): voxel centre lies on the patient's left of ``midline``."""
    rows, cols = volume.shape[1:]
    out = np.empty(volume.shape, dtype=bool)
    ys, xs = np.mgrid[0:rows, 0:cols]
    for z in range(volume.shape[0]):
        px = volume.index_to_patient(z, ys.ravel(), xs.ravel())[:, 0]
        out[z] = (px > midline).reshape(rows, cols)
    return out


def bones(volume: Volume, body: np.ndarray) -> np.ndarray:
    mask = (volume.hu > BONE_HU) & body
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    voxel_cc = volume.voxel_volume_mm3 / 1000.0
    sizes = ndimage.sum_labels(np.ones(volume.shape) * voxel_cc[:, None, None], labels,
                               index=np.arange(1, count + 1))
    keep = np.zeros(count + 1, dtype=bool)
    keep[1:] = sizes >= MIN_BONE_CC
    return keep[labels]


def spinal_canal(volume: Volume, body: np.ndarray, bone: np.ndarray) -> np.ndarray:
    """Soft tissue enclosed by a vertebra's bony ring, near the posterior midline."""
    canal = np.zeros(volume.shape, dtype=bool)
    pixel_mm2 = volume.pixel_spacing[0] * volume.pixel_spacing[1]
    for z in np.flatnonzero(bone.any(axis=(1, 2))):
        enclosed = ndimage.binary_fill_holes(bone[z]) & ~bone[z] & body[z]
        labels, count = ndimage.label(enclosed)
        best, best_score = None, None
        for label in range(1, count + 1):
            component = labels == label
            area = component.sum() * pixel_mm2
            if not 50.0 <= area <= 600.0:  # a spinal canal is 0.5 to 6 cm^2
                continue
            ys, xs = np.nonzero(component)
            point = volume.index_to_patient(int(z), ys, xs).mean(axis=0)
            score = abs(point[0])  # closest to the midline wins
            if best_score is None or score < best_score:
                best, best_score = component, score
        if best is not None:
            canal[z] = best
    return canal


class ClassicalEngine:
    """Engine protocol implementation with no model weights."""

    name = "classical"
    SUPPORTED = ("External", "Lung_L", "Lung_R", "Lungs", "Bones", "SpinalCanal")

    @property
    def description(self) -> str:
        return "classical CT thresholds and morphology (no model weights)"

    def supports(self, structure: Structure) -> bool:
        return structure.name in self.SUPPORTED

    def segment(self, volume: Volume, structures: Sequence[Structure]) -> list[StructureResult]:
        cache: dict[str, np.ndarray] = {}

        def get(name: str, build: Callable[[], np.ndarray]) -> np.ndarray:
            if name not in cache:
                cache[name] = build()
            return cache[name]

        def body() -> np.ndarray:
            return get("External", lambda: external(volume))

        def lung_pair() -> tuple[np.ndarray, np.ndarray]:
            if "Lung_L" not in cache:
                cache["Lung_L"], cache["Lung_R"] = lungs(volume, body())
            return cache["Lung_L"], cache["Lung_R"]

        builders: dict[str, Callable[[], np.ndarray]] = {
            "External": body,
            "Lung_L": lambda: lung_pair()[0],
            "Lung_R": lambda: lung_pair()[1],
            "Lungs": lambda: lung_pair()[0] | lung_pair()[1],
            "Bones": lambda: get("Bones", lambda: bones(volume, body())),
            "SpinalCanal": lambda: spinal_canal(
                volume, body(), get("Bones", lambda: bones(volume, body()))),
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
