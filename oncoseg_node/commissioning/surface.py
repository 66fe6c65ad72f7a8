"""Surface elements of a mask and the surface-distance metrics built on them.

A mask's surface is made of surface elements ("surfels"): for every 2x2x2
neighbourhood of voxels that is neither all inside nor all outside, the
marching-cubes triangles through it (:mod:`surfel_normals`). Each surfel is
placed at the cube's centre (a voxel corner) and weighted by its triangles'
area in mm^2, so a metric integrates over the surface as drawn, not over a
count of voxels, and does not change when the pixel grid is made finer.

Geometry is per slice: a corner between slices k-1 and k lies midway
between their ImagePositionPatient, and its cube's thickness is the gap
between those two slices, so non-uniform slice spacing is measured as it
is. Distances are Euclidean in patient coordinates (LPS, mm) from each
surfel of one mask to the nearest surfel of the other.

Definitions (as in Nikolov et al. 2021 and DeepMind's surface-distance):

- surface Dice at tolerance t: the area of both surfaces lying within t of
  the other surface, over the total area of both surfaces;
- mean surface distance: the area-weighted mean of the distances of both
  surfaces' surfels to the other surface (the two directions pooled);
- HD95: the symmetric 95th-percentile Hausdorff distance: for each
  surface, the area-weighted 95th percentile of its distances to the other;
  the larger of the two (the symmetric Hausdorff distance takes the larger
  directed one, so a structure that misses a lobe is not forgiven because the
  other surface happens to be close to it).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.spatial import cKDTree

from oncoseg_node.commissioning.surfel_normals import NEIGHBOUR_BITS, NORMALS_EIGHTHS
from oncoseg_node.contouring.volume import Volume

# Slice gaps equal to a micrometre share one area table.
_GAP_DECIMALS = 3


@lru_cache(maxsize=1)
def _normals() -> np.ndarray:
    """(256, 4, 3) surfel normals in voxel units, zero-padded to four per code."""
    table = np.zeros((256, 4, 3))
    for code, normals in enumerate(NORMALS_EIGHTHS):
        for k, normal in enumerate(normals):
            table[code, k] = np.asarray(normal, dtype=float) / 8.0
    return table


def surfel_area_table(spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """Area in mm^2 of each neighbour code's surface for a ``(z, y, x)`` voxel size."""
    sz, sy, sx = spacing_mm
    scaled = _normals() * np.array([sy * sx, sz * sx, sz * sy])
    return np.linalg.norm(scaled, axis=2).sum(axis=1)


@dataclass(frozen=True)
class Surface:
    """Surfel centres ``points`` (n, 3) in LPS mm and their areas ``areas`` (n,) in mm^2.

    ``corners`` numbers each surfel's voxel corner on the lattice both
    compared surfaces share, so coincident surfels are found without a search.
    """

    points: np.ndarray
    areas: np.ndarray
    corners: np.ndarray

    @property
    def empty(self) -> bool:
        return len(self.areas) == 0


def _neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """Neighbour code of every voxel corner of a ``(z, y, x)`` mask: shape + 1 on each axis."""
    padded = np.pad(mask.astype(np.uint8), 1)
    nz, ny, nx = (n + 1 for n in mask.shape)
    codes = np.zeros((nz, ny, nx), dtype=np.uint8)
    for (dz, dy, dx), bit in NEIGHBOUR_BITS.items():
        codes |= padded[dz:dz + nz, dy:dy + ny, dx:dx + nx] * np.uint8(bit)
    return codes


def _corner_geometry(volume: Volume, z0: int, z1: int) -> tuple[np.ndarray, np.ndarray]:
    """Origins (n + 1, 3) and thicknesses (n + 1,) of the corner layers around slices z0..z1-1.

    Layer j lies between slices z0 + j - 1 and z0 + j; beyond the first and
    last slice of the series the neighbouring gap is continued.
    """
    positions = volume.positions.astype(np.float64)
    if len(positions) > 1:
        first = 2 * positions[0] - positions[1]
        last = 2 * positions[-1] - positions[-2]
    else:  # one slice: its nominal thickness along the normal
        step = float(volume.header.get("SliceThickness", 1.0) or 1.0) * volume.normal
        first, last = positions[0] - step, positions[0] + step
    extended = np.vstack([first, positions, last])  # extended[k + 1] is slice k
    below = extended[z0:z1 + 1]
    above = extended[z0 + 1:z1 + 2]
    origins = (below + above) / 2.0
    thickness = np.abs((above - below) @ volume.normal)
    return origins, thickness


Box = tuple[slice, slice, slice]


def bounding_box(mask: np.ndarray) -> Box | None:
    """The smallest ``(z, y, x)`` slices holding every True voxel, or None when there is none."""
    planes = np.flatnonzero(mask.any(axis=(1, 2)))
    if not len(planes):
        return None
    zs = slice(int(planes[0]), int(planes[-1]) + 1)
    inner = mask[zs]
    rows = np.flatnonzero(inner.any(axis=(0, 2)))
    cols = np.flatnonzero(inner.any(axis=(0, 1)))
    return zs, slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def surfaces(volume: Volume, a: np.ndarray, b: np.ndarray,
             box: Box | None = None) -> tuple[Surface, Surface]:
    """The surfaces of two masks on ``volume``'s grid.

    ``a`` and ``b`` are ``(z, y, x)`` masks of the whole volume, or, with
    ``box``, both already cropped to ``box`` (which must hold every True voxel).
    """
    if box is None:
        box = bounding_box(a | b)
        if box is None:
            nothing = Surface(np.zeros((0, 3)), np.zeros(0), np.zeros(0, np.int64))
            return nothing, nothing
        a, b = a[box], b[box]
    zs, ys, xs = box
    origins, thickness = _corner_geometry(volume, zs.start, zs.stop)
    gaps = np.round(thickness, _GAP_DECIMALS)
    row_mm, col_mm = volume.pixel_spacing
    tables = {gap: surfel_area_table((float(gap), row_mm, col_mm)) for gap in np.unique(gaps)}
    return tuple(  # type: ignore[return-value]
        _surface(mask, volume, origins, gaps, tables, ys.start, xs.start) for mask in (a, b))


def _surface(crop: np.ndarray, volume: Volume, origins: np.ndarray, gaps: np.ndarray,
             tables: dict[float, np.ndarray], y0: int, x0: int) -> Surface:
    codes = _neighbour_codes(crop)
    border = (codes != 0) & (codes != 255)
    layers, rows, cols = np.nonzero(border)
    if not len(layers):
        return Surface(np.zeros((0, 3)), np.zeros(0), np.zeros(0, np.int64))
    code_values = codes[layers, rows, cols]
    areas = np.empty(len(layers))
    layer_gap = gaps[layers]
    for gap, table in tables.items():
        here = layer_gap == gap
        areas[here] = table[code_values[here]]
    # corner (layer, r, c) sits half a pixel before pixel (r, c) of the crop
    row_index = rows + (y0 - 0.5)
    col_index = cols + (x0 - 0.5)
    points = (origins[layers]
              + (col_index * volume.pixel_spacing[1])[:, None] * volume.row_direction[None, :]
              + (row_index * volume.pixel_spacing[0])[:, None] * volume.col_direction[None, :])
    corners = np.ravel_multi_index((layers, rows, cols), codes.shape)
    return Surface(points, areas, corners)


def distances(source: Surface, target: Surface) -> np.ndarray:
    """Distance in mm from each surfel of ``source`` to the nearest surfel of ``target``."""
    if source.empty:
        return np.zeros(0)
    if target.empty:
        return np.full(len(source.areas), np.inf)
    # Where the two contours agree, most surfels coincide: distance 0, no search.
    out = np.zeros(len(source.areas))
    apart = ~np.isin(source.corners, target.corners, assume_unique=True)
    if apart.any():
        tree = cKDTree(target.points, balanced_tree=False, compact_nodes=False)
        out[apart] = tree.query(source.points[apart], workers=-1)[0]
    return out


@dataclass(frozen=True)
class SurfaceScores:
    """Surface metrics of one pair of masks; distances are inf when either surface is empty."""

    surface_dice: float
    msd_mm: float
    hd95_mm: float


def weighted_percentile(values: np.ndarray, weights: np.ndarray, percent: float) -> float:
    """The smallest value whose cumulative weight fraction reaches ``percent``/100."""
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order]) / weights.sum()
    index = min(int(np.searchsorted(cumulative, percent / 100.0)), len(values) - 1)
    return float(values[order][index])


def surface_scores(volume: Volume, ours: np.ndarray, reference: np.ndarray, *,
                   tolerance_mm: float, box: Box | None = None) -> SurfaceScores:
    """Surface Dice at ``tolerance_mm``, mean surface distance and HD95 (module docstring).

    ``box`` as in :func:`surfaces`.
    """
    a, b = surfaces(volume, ours, reference, box)
    if a.empty and b.empty:
        return SurfaceScores(1.0, 0.0, 0.0)
    if a.empty or b.empty:
        return SurfaceScores(0.0, float("inf"), float("inf"))
    d_ab, d_ba = distances(a, b), distances(b, a)
    d = np.concatenate([d_ab, d_ba])
    w = np.concatenate([a.areas, b.areas])
    return SurfaceScores(surface_dice=float(w[d <= tolerance_mm].sum() / w.sum()),
                         msd_mm=float((d * w).sum() / w.sum()),
                         hd95_mm=max(weighted_percentile(d_ab, a.areas, 95.0),
                                     weighted_percentile(d_ba, b.areas, 95.0)))
