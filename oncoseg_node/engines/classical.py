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


def _upsample2(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return np.repeat(np.repeat(mask, 2, axis=0), 2, axis=1)[:shape[0], :shape[1]]


def _fill_holes_cropped(mask: np.ndarray) -> np.ndarray:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return mask
    cols = np.flatnonzero(mask.any(axis=0))
    out = mask.copy()
    window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    out[window] = ndimage.binary_fill_holes(mask[window])
    return out


def external(volume: Volume) -> np.ndarray:
    """Body outline: largest opened component per slice, holes filled.

    The opening that cuts the couch and thin immobilisation shells away runs
    at half resolution (4x fewer pixels, a 2x smaller disk); the outline
    itself is then taken from the full-resolution threshold next to it.
    """
    radius = max(int(round(COUCH_OPENING_MM / 4 / min(volume.pixel_spacing))), 1)
    footprint = _disk(radius)
    body = np.zeros(volume.shape, dtype=bool)
    shape = volume.shape[1:]
    for z in range(volume.shape[0]):
        candidate = volume.hu[z] > BODY_HU
        if not candidate.any():
            continue
        small = candidate[::2, ::2]
        core = _largest_component_2d(ndimage.binary_opening(small, structure=footprint))
        if not core.any():
            continue
        # Give back the skin the opening shaved off, but not the couch:
        # only thresholded pixels next to the kept core.
        near = _upsample2(ndimage.binary_dilation(core, structure=footprint, iterations=1),
                          shape)
        body[z] = _fill_holes_cropped(_largest_component_2d(candidate & near))
    return body


def lungs(volume: Volume, body: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(left, right) lungs in the patient's sense; empty when no lung is in view."""
    empty = np.zeros(volume.shape, dtype=bool)
    if not body.any():
        return empty, empty.copy()
    # Work inside the body's bounding box: the air around it is most of the grid.
    box = tuple(slice(int(ix[0]), int(ix[-1]) + 1) for ix in (
        np.flatnonzero(body.any(axis=(1, 2))), np.flatnonzero(body.any(axis=(0, 2))),
        np.flatnonzero(body.any(axis=(0, 1)))))
    inner = body[box]
    aerated = (volume.hu[box] < LUNG_HU) & inner
    # Trachea and main bronchi: air that is not parenchyma, widened by a voxel
    # so the partial-volume rim of the airway wall is not taken as lung.
    air = ndimage.binary_dilation((volume.hu[box] < AIRWAY_HU) & inner, iterations=1)
    aerated = ndimage.binary_opening(aerated & ~air, iterations=1)
    cropped, count = ndimage.label(aerated)
    if count == 0:
        return empty, empty.copy()
    labels = np.zeros(volume.shape, dtype=cropped.dtype)
    labels[box] = cropped
    sizes = _component_cc(volume, labels, count)
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


def _component_cc(volume: Volume, labels: np.ndarray, count: int) -> np.ndarray:
    """Volume in cc of labels 1..count, each slice weighted by its own voxel volume."""
    voxel_cc = volume.voxel_volume_mm3 / 1000.0
    sizes = np.zeros(count + 1)
    for z in np.flatnonzero(labels.any(axis=(1, 2))):
        sizes += np.bincount(labels[z].ravel(), minlength=count + 1) * voxel_cc[z]
    return sizes[1:]


def _drop_small(volume: Volume, mask: np.ndarray) -> np.ndarray:
    return mask if volume.mask_volume_cc(mask) >= MIN_LUNG_CC else np.zeros_like(mask)


def _patient_x(volume: Volume, mask: np.ndarray) -> float:
    """Mean patient x (mm) of a mask, each slice mapped with its own geometry.

    The index-to-patient map is affine within a slice, so a slice's centroid
    maps to the centroid of its points: one point per slice suffices.
    """
    total, count = 0.0, 0
    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        ys, xs = np.nonzero(mask[z])
        point = volume.index_to_patient(int(z), np.array([ys.mean()]), np.array([xs.mean()]))
        total += float(point[0, 0]) * len(xs)
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
    sizes = _component_cc(volume, labels, count)
    keep = np.zeros(count + 1, dtype=bool)
    keep[1:] = sizes >= MIN_BONE_CC
    return keep[labels]


def spinal_canal(volume: Volume, body: np.ndarray, bone: np.ndarray) -> np.ndarray:
    """Soft tissue enclosed by a vertebra's bony ring, near the posterior midline."""
    canal = np.zeros(volume.shape, dtype=bool)
    pixel_mm2 = volume.pixel_spacing[0] * volume.pixel_spacing[1]
    for z in np.flatnonzero(bone.any(axis=(1, 2))):
        enclosed = _fill_holes_cropped(bone[z]) & ~bone[z] & body[z]
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
