"""Sanity flag: a contrast-filled vessel inside Bones, whichever engine drew it.

Iodinated blood is as dense as trabecular bone, so a threshold (or a model)
can take the aorta into Bones where it touches the vertebrae. A vessel reads
differently from bone: its HU is homogeneous (spread about image noise) and
nothing denser encloses it, while bone has a cortex much denser than its
marrow all round; its cross-section is round and it runs along the table.

Per axial plane of the Bones mask, pixels whose neighbourhood is homogeneous
and of contrast density are kept; that parts the aorta from the cortex it
leans on even where the two share a wide border, which no opening alone
does. After an in-plane opening, each blob of vessel size is judged for
roundness, homogeneity and a denser rim; the blobs that pass are linked
where they overlap on adjacent slices, and a tube long enough is flagged.
Masks are :class:`MaskCrop` on the volume's ``(z, y, x)`` grid; only a
window around the mask's box is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from oncoseg_node.contouring.mask_crop import MaskCrop
from oncoseg_node.contouring.volume import Volume

BONES = "Bones"

TUBE_HU = (150.0, 600.0)  # iodinated blood; bone's mean alone does not tell them apart
TUBE_STD_HU = 45.0  # about image noise: bone's cortex and marrow differ by hundreds
LOCAL_MM = 2.0  # half-width of the window that judges a pixel's neighbourhood
OPENING_RADIUS_MM = 3.0  # cuts thin bridges left between a vessel and its neighbours
TUBE_MIN_AREA_MM2 = 50.0
TUBE_MIN_AXIS_RATIO = 0.5  # minor / major axis of the blob's second moments
TUBE_MIN_ELLIPSE_FILL = 0.85  # area / area of the ellipse with the same moments
# Marrow is enclosed by bone (a cortex denser than it, or more marrow) in most
# directions round it; a vessel that leans on a bone, in a few. Judged in
# RIM_SECTORS directions, in a ring up to RIM_MM outside the blob.
RIM_MM = 5.0
# a vessel's own edge, left out by the homogeneity test (LOCAL_MM) and blurred
# over a pixel or so, lies closer than this
RIM_INNER_MM = LOCAL_MM + 1.5
CORTEX_ABOVE_HU = 100.0
RIM_SECTORS = 16
# Marrow scores 0.75 or more; an aorta leaning on a vertebra with calcified plaque
# in a third of its wall about 0.6.
MAX_BONY_SECTORS = 0.7
TUBE_MIN_LENGTH_MM = 30.0


@dataclass(frozen=True)
class _Plane:
    """One axial plane of the Bones mask and its HU, in a window round the mask's box."""

    mask: np.ndarray
    hu: np.ndarray  # float64
    spacing: tuple[float, float]


def _windows(volume: Volume, bones: MaskCrop) -> tuple[slice, slice]:
    """The mask's rows and columns widened by the rim, clipped to the image."""
    dr, dc = volume.pixel_spacing
    pad_r, pad_c = int(np.ceil(RIM_MM / dr)) + 1, int(np.ceil(RIM_MM / dc)) + 1
    _, rows, cols = bones.box
    return (slice(max(rows.start - pad_r, 0), min(rows.stop + pad_r, volume.shape[1])),
            slice(max(cols.start - pad_c, 0), min(cols.stop + pad_c, volume.shape[2])))


def _plane(volume: Volume, bones: MaskCrop, k: int, rows: slice, cols: slice) -> _Plane:
    """Plane ``k`` of the crop in the window ``rows, cols`` of the grid."""
    z0, y0, x0 = bones.origin
    mask = np.zeros((rows.stop - rows.start, cols.stop - cols.start), dtype=bool)
    h, w = bones.array.shape[1:]
    mask[y0 - rows.start:y0 - rows.start + h, x0 - cols.start:x0 - cols.start + w] = \
        bones.array[k]
    return _Plane(mask, volume.hu[z0 + k, rows, cols].astype(np.float64),
                  volume.pixel_spacing)


def _homogeneous(plane: _Plane) -> np.ndarray:
    """Mask pixels whose neighbourhood has contrast density and noise-like spread."""
    size = tuple(2 * max(int(round(LOCAL_MM / s)), 1) + 1 for s in plane.spacing)
    mean = ndi.uniform_filter(plane.hu, size, mode="nearest")
    square = ndi.uniform_filter(plane.hu * plane.hu, size, mode="nearest")
    std = np.sqrt(np.maximum(square - mean * mean, 0.0))
    return np.asarray(plane.mask & (std < TUBE_STD_HU)
                      & (mean >= TUBE_HU[0]) & (mean <= TUBE_HU[1]))


def _opened(mask: np.ndarray, spacing: tuple[float, float], radius: float) -> np.ndarray:
    """In-plane opening by a disk of ``radius`` mm, from two distance maps.

    Exact for any pixel spacing; the mask is padded so that its border counts
    as outside.
    """
    padded = np.pad(mask, 1)
    core = ndi.distance_transform_edt(padded, sampling=spacing) > radius
    if not core.any():
        return np.zeros_like(mask)
    kept = ndi.distance_transform_edt(~core, sampling=spacing) <= radius
    return np.asarray(kept[1:-1, 1:-1] & mask)


@dataclass(frozen=True)
class _Blobs:
    """The labelled pixels of one plane's blobs: label (1..count), row, column, HU."""

    count: int
    label: np.ndarray
    row: np.ndarray
    col: np.ndarray
    hu: np.ndarray

    @classmethod
    def of(cls, labels: np.ndarray, count: int, hu: np.ndarray) -> _Blobs:
        rows, cols = np.nonzero(labels)
        return cls(count, labels[rows, cols], rows, cols, hu[rows, cols])

    def sums(self, values: np.ndarray | None = None) -> np.ndarray:
        """Sum of ``values`` (one per pixel; None counts pixels) per blob, by label - 1."""
        return np.bincount(self.label, values, minlength=self.count + 1)[1:]

    def hu_sums(self) -> np.ndarray:
        """Per blob (columns): pixel count, sum of HU, sum of HU^2."""
        return np.stack([self.sums(), self.sums(self.hu), self.sums(self.hu * self.hu)])


def _mean_std(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of HU from (count, sum, sum of squares)."""
    mean = sums[1] / sums[0]
    return mean, np.sqrt(np.maximum(sums[2] / sums[0] - mean ** 2, 0.0))


def _round_and_even(blobs: _Blobs, spacing: tuple[float, float]
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which blobs are of vessel size, round and homogeneous; their centres and mean HU.

    Roundness from each blob's second moments in mm: the ratio of its axes,
    and how much of the ellipse with those moments it fills (a ring, a
    crescent or an L fills little of it).
    """
    dr, dc = spacing
    y, x = blobs.row * dr, blobs.col * dc
    stats = blobs.hu_sums()
    n = stats[0]
    my, mx = blobs.sums(y) / n, blobs.sums(x) / n
    vyy, vxx = blobs.sums(y * y) / n - my ** 2, blobs.sums(x * x) / n - mx ** 2
    vxy = blobs.sums(x * y) / n - my * mx
    spread = np.sqrt(((vyy - vxx) / 2) ** 2 + vxy ** 2)
    major, minor = (vyy + vxx) / 2 + spread, np.maximum((vyy + vxx) / 2 - spread, 0.0)
    area = n * dr * dc
    ellipse = 4 * np.pi * np.sqrt(major * minor)  # area of the ellipse with these moments
    mean, std = _mean_std(stats)
    passes = ((area >= TUBE_MIN_AREA_MM2) & (std < TUBE_STD_HU)
              & (mean >= TUBE_HU[0]) & (mean <= TUBE_HU[1])
              & (np.sqrt(minor) >= TUBE_MIN_AXIS_RATIO * np.sqrt(major))
              & (area >= TUBE_MIN_ELLIPSE_FILL * ellipse))
    return np.asarray(passes), np.stack([my / dr, mx / dc]), mean


def _bony_rim(labels: np.ndarray, count: int, plane: _Plane, centres: np.ndarray,
              mean: np.ndarray) -> np.ndarray:
    """Share of directions round each blob in which bone encloses it.

    Bone in a direction is a pixel within RIM_MM outside the blob that is
    CORTEX_ABOVE_HU denser than the blob (a cortex), or a pixel of the mask
    beyond RIM_INNER_MM (more marrow, where a cortex is open): a vessel's own
    edge lies closer than that, and beyond it lie fat and soft tissue.
    """
    distance, nearest = ndi.distance_transform_edt(labels == 0, sampling=plane.spacing,
                                                   return_indices=True)
    owner = labels[nearest[0], nearest[1]]
    dense = plane.hu > np.concatenate([[np.inf], mean + CORTEX_ABOVE_HU])[owner]
    marrow = plane.mask & (distance >= RIM_INNER_MM)
    bony = (distance > 0) & (distance <= RIM_MM) & (dense | marrow)
    r, c = np.nonzero(bony)
    who = owner[r, c] - 1
    angle = np.arctan2(r - centres[0][who], c - centres[1][who])
    sector = ((angle + np.pi) / (2 * np.pi) * RIM_SECTORS).astype(np.int64) % RIM_SECTORS
    hit = np.zeros((count, RIM_SECTORS), dtype=bool)
    hit[who, sector] = True
    return np.asarray(hit.mean(axis=1))


def _padded_box(mask: np.ndarray, spacing: tuple[float, float]) -> tuple[slice, slice]:
    """The bounding box of ``mask`` widened by the rim, within the plane."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    pad_r, pad_c = (int(np.ceil(RIM_MM / s)) + 2 for s in spacing)
    return (slice(max(rows[0] - pad_r, 0), rows[-1] + pad_r + 1),
            slice(max(cols[0] - pad_c, 0), cols[-1] + pad_c + 1))


def vessel_sections(volume: Volume, bones: MaskCrop, k: int, rows: slice, cols: slice
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blobs of plane ``k`` of ``bones`` in the window ``rows, cols``: labels, which
    look like a contrast-filled vessel's cross-section, and their HU sums
    (pixel count, sum, sum of squares), indexed by label - 1."""
    plane = _plane(volume, bones, k, rows, cols)
    candidates = _homogeneous(plane)
    labels = np.zeros(candidates.shape, dtype=np.int32)
    if not candidates.any():
        return labels, np.zeros(0, dtype=bool), np.zeros((3, 0))
    # only the candidates' box (and its rim) is opened and measured
    box = _padded_box(candidates, plane.spacing)
    part = _Plane(plane.mask[box], plane.hu[box], plane.spacing)
    labels[box], count = ndi.label(_opened(candidates[box], plane.spacing, OPENING_RADIUS_MM))
    if not count:
        return labels, np.zeros(0, dtype=bool), np.zeros((3, 0))
    blobs = _Blobs.of(labels[box], count, part.hu)
    passes, centres, mean = _round_and_even(blobs, plane.spacing)
    vessel = passes.copy()
    if passes.any():
        vessel &= _bony_rim(labels[box], count, part, centres, mean) <= MAX_BONY_SECTORS
    return labels, vessel, blobs.hu_sums()


class _Tubes:
    """Vessel sections linked across slices where they overlap (union-find on section ids)."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.slices: list[set[int]] = []
        self.sums: list[np.ndarray] = []  # pixel count, sum of HU, sum of HU^2

    def add(self, z: int, sums: np.ndarray) -> int:
        self.parent.append(len(self.parent))
        self.slices.append({z})
        self.sums.append(sums)
        return len(self.parent) - 1

    def root(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def join(self, a: int, b: int) -> None:
        a, b = self.root(a), self.root(b)
        if a != b:
            self.parent[b] = a
            self.slices[a] |= self.slices[b]
            self.sums[a] = self.sums[a] + self.sums[b]

    def groups(self) -> list[tuple[set[int], float, float]]:
        """(slices, mean HU, HU standard deviation) of each linked tube."""
        out = []
        for i in {self.root(i) for i in range(len(self.parent))}:
            mean, std = _mean_std(self.sums[i])
            out.append((self.slices[i], float(mean), float(std)))
        return out


def _link_tubes(volume: Volume, bones: MaskCrop) -> _Tubes:
    """Vessel sections of each axial plane of ``bones``, linked along z where they overlap."""
    rows, cols = _windows(volume, bones)
    tubes = _Tubes()
    previous = np.zeros((rows.stop - rows.start, cols.stop - cols.start), dtype=np.int64)
    for k in range(bones.array.shape[0]):
        labels, vessel, sums = vessel_sections(volume, bones, k, rows, cols)
        ids = np.zeros(len(vessel) + 1, dtype=np.int64)  # tube id + 1; 0 for none
        for label in np.flatnonzero(vessel) + 1:
            ids[label] = tubes.add(bones.origin[0] + k, sums[:, label - 1]) + 1
        current = ids[labels]
        touching = (current > 0) & (previous > 0)
        for a, b in set(zip(previous[touching].tolist(), current[touching].tolist(),
                            strict=True)):
            tubes.join(a - 1, b - 1)
        previous = current
    return tubes


def tube_flag(volume: Volume, bones: MaskCrop) -> str | None:
    """A message when ``bones`` holds a homogeneous round tube of contrast (a vessel).

    A tube is vessel sections (see :func:`vessel_sections`) linked along z,
    at least TUBE_MIN_LENGTH_MM long and, as a whole, with a mean in TUBE_HU
    and a spread under TUBE_STD_HU; the longest is named.
    """
    thickness = volume.voxel_volume_mm3 / (volume.pixel_spacing[0] * volume.pixel_spacing[1])
    best: tuple[float, float] | None = None
    for slices, mean, std in _link_tubes(volume, bones).groups():
        length = float(thickness[sorted(slices)].sum())
        if (length >= TUBE_MIN_LENGTH_MM and std < TUBE_STD_HU
                and TUBE_HU[0] <= mean <= TUBE_HU[1] and (best is None or length > best[1])):
            best = (mean, length)
    if best is None:
        return None
    return (f"{BONES} holds a homogeneous round tube of {best[0]:.0f} HU over "
            f"{best[1]:.0f} mm (a contrast-filled vessel?)")
