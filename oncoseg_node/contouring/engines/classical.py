"""The weight-free CT engine: structures that CT physics alone defines well.

External (body outline without couch, immobilisation or air), Lung_L,
Lung_R and Lungs (trachea and main bronchi excluded), Bones and SpinalCanal,
from Hounsfield thresholds and slice-wise morphology on numpy/scipy. Masks
are ``(z, y, x)`` on the volume's grid. Left and right are decided in patient
coordinates (LPS: +x is the patient's left) through each slice's own
geometry, and the couch side from PatientPosition (supine: posterior, prone:
anterior), so HFS, HFP, FFS and FFP series all come out right.

Each step works inside the bounding box of what it looks at, so a pelvis
costs nothing for lungs and a 150-slice 512x512 thorax takes a few seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

from oncoseg_node.contouring.engines.base import StructureResult
from oncoseg_node.contouring.engines.postprocess import (
    IN_PLANE,
    bbox,
    component_sizes_cc,
    dilate,
    fill_holes,
    opening,
    postprocess,
    radius_px,
)
from oncoseg_node.contouring.protocols import Structure
from oncoseg_node.contouring.volume import Volume

BODY_HU = -350.0       # skin/air edge; couch foam, headrests and vacuum bags stay below
LUNG_HU = -400.0       # half way between aerated lung (~-850) and soft tissue (~40)
GAS_HU = -950.0        # pure air (airways, bowel, oesophagus); parenchyma stays above
BONE_HU = 180.0        # above any unenhanced soft tissue, below cancellous bone
SOFT_HU = 40.0         # what bone borders; its edge lies half way to the bone's peak
PEAK_MM = 2.0
MARROW_HU = 100.0      # a hole in the bone mask denser than this is marrow, not canal
CANAL_HU = (-50.0, 100.0)
CANAL_MM2 = (50.0, 600.0)  # a spinal canal's cross-section is 0.5 to 6 cm^2
CANAL_GAP_MM = 20.0    # discs open the bony ring; bridge gaps up to this long
OPEN_MM = 3.0          # thinner than 2x this (masks, straps, cables) is not patient
WALL_MM = 3.0          # airway wall (and blurred lumen edge) excluded from lung with the air
COUCH_STEP_MM = 30.0   # a couch top is this much wider than the body just above it
MIN_LUNG_CC = 30.0     # smaller aerated pockets are not a lung
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
    labels, count = ndimage.label(core)
    if count == 0:
        return body
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.concatenate([[False], sizes >= MIN_BODY_FRACTION * sizes.max()])
    core = keep[labels]
    # Give back the skin detail the opening shaved off, not what lies beyond it.
    body[box] = fill_holes(cand & dilate(core, ry, rx) | core)
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


def _split_merged(volume: Volume, part: np.ndarray, box: tuple[slice, ...],
                  mid: np.ndarray) -> np.ndarray:
    """Left (patient) share of two lungs joined at a junction; ``part`` given on ``box``.

    On axial images each slice is cut at the column within 40 mm of the
    body's midline where the joined lungs are thinnest (the junction line,
    which is often off the midline); on oblique images voxels go by side.
    """
    x_of = patient_x(volume, box) - mid[box[0], None, None]
    if x_of.shape[1] != 1:
        return part & (x_of > 0)
    left = np.zeros_like(part)
    for k in np.flatnonzero(part.any(axis=(1, 2))):
        col_x = x_of[k, 0]
        profile = part[k].sum(axis=0).astype(float)
        profile[np.abs(col_x) > 40.0] = np.inf
        cut = col_x[int(np.argmin(profile))] if np.isfinite(profile).any() else 0.0
        left[k] = part[k] & (col_x > cut)[None, :]
    return left


def _airways(volume: Volume, aerated: np.ndarray, hu: np.ndarray) -> np.ndarray:
    """Trachea, bronchi and other gas outside the lungs, with a wall's width around it.

    Pure air that some slice shows outside the aerated lung's outline (the
    trachea in the mediastinum, gas in oesophagus or bowel) is airway or gas,
    and so is all pure air connected to it in 3D: the main bronchi inside the
    lungs. Pure air enclosed by lung throughout (bullae, noise) stays lung.
    """
    gas = (hu < GAS_HU) & aerated
    if not gas.any():
        return gas
    labels, _ = ndimage.label(gas, structure=np.ones((3, 3, 3)))  # bronchi run obliquely
    # Leave out the air's own blurred rim, or every airway would look enclosed by "lung".
    outside = labels[gas & ~fill_holes(aerated & ~dilate(gas, 1, 1))]
    tree = np.isin(labels, np.unique(outside[outside > 0]))
    return dilate(tree, *radius_px(volume, WALL_MM)) if tree.any() else tree


def lungs(volume: Volume, body: np.ndarray, mid: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray]:
    """(left, right) lungs in the patient's sense; empty when no lung is in view.

    ``mid`` is the body's midline (patient x) per slice, from :func:`midlines`.
    """
    empty = np.zeros(volume.shape, dtype=bool)
    box = bbox((volume.hu < LUNG_HU) & body, pad=2)
    if box is None:
        return empty, empty.copy()
    aerated = (volume.hu[box] < LUNG_HU) & body[box]
    airway = _airways(volume, aerated, volume.hu[box])
    labels, count = ndimage.label(aerated & ~airway)
    sizes = component_sizes_cc(volume, labels, count, box[0].start)
    x_of = patient_x(volume, box) - np.nan_to_num(mid[box[0]])[:, None, None]
    left, right = np.zeros_like(aerated), np.zeros_like(aerated)
    for label in np.flatnonzero(sizes >= MIN_LUNG_CC) + 1:
        part = labels == label
        share_left = float((part & (x_of > 0)).sum() / part.sum())
        if share_left >= 0.8:
            left |= part
        elif share_left <= 0.2:
            right |= part
        else:  # both lungs in one component: joined at the anterior junction
            part_box = bbox(part)
            assert part_box is not None  # a labelled component has voxels
            on_left = np.zeros_like(part)
            on_left[part_box] = _split_merged(volume, part[part_box],
                                              _abs_box(box, part_box), np.nan_to_num(mid))
            left |= on_left
            right |= part & ~on_left
    out = []
    for side in (left, right):
        full = np.zeros(volume.shape, dtype=bool)
        # Vessels inside a lung are lung; airways stay out even where a lung encloses them.
        full[box] = fill_holes(side) & ~airway
        out.append(full if volume.mask_volume_cc(full) >= MIN_LUNG_CC else empty.copy())
    return out[0], out[1]


def _abs_box(outer: tuple[slice, ...], inner: tuple[slice, ...]) -> tuple[slice, ...]:
    return tuple(slice(o.start + i.start, o.start + i.stop)
                 for o, i in zip(outer, inner, strict=True))


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

        def body() -> np.ndarray:
            if "External" not in cache:
                cache["External"] = external(volume)
            return cache["External"]

        def mid() -> np.ndarray:
            if "midline" not in cache:
                cache["midline"] = midlines(volume, body())
            return cache["midline"]

        def lung_pair() -> tuple[np.ndarray, np.ndarray]:
            if "Lung_L" not in cache:
                cache["Lung_L"], cache["Lung_R"] = lungs(volume, body(), mid())
            return cache["Lung_L"], cache["Lung_R"]

        def skeleton() -> tuple[np.ndarray, np.ndarray]:
            if "Bones" not in cache:
                cache["Bones"], cache["SpinalCanal"] = bones_and_canal(volume, body(), mid())
            return cache["Bones"], cache["SpinalCanal"]

        builders: dict[str, Callable[[], np.ndarray]] = {
            "External": body,
            "Lung_L": lambda: lung_pair()[0],
            "Lung_R": lambda: lung_pair()[1],
            "Lungs": lambda: lung_pair()[0] | lung_pair()[1],
            "Bones": lambda: skeleton()[0],
            "SpinalCanal": lambda: skeleton()[1],
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
