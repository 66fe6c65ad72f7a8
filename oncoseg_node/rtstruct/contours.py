"""Masks to closed planar contours that follow pixel edges, and back.

A contour runs along the boundary between inside and outside pixels, so its
area is exactly the area of the pixels (a contour through pixel centres
loses half a pixel all round: 5% of a 2 cm sphere). Vertices are grid
corners in image index space, ``(x, y) = (column, row)`` with the centre of
pixel (row 0, column 0) at (0.5, 0.5); :func:`corners_to_index` converts to
DICOM pixel indices (the first pixel's centre at 0, 0).

Inside pixels are connected through their edges (4-connectivity): pixels
touching only at a corner belong to separate contours. Outer boundaries
come out with positive signed area, holes with negative.

Written here, not taken from a library, because none traces pixel edges:
scikit-image's ``find_contours`` (marching squares) and OpenCV's
``findContours`` (used by rt-utils) both run through pixel centres, so they
lose that half pixel, and neither says which loop is a hole of which region,
which the keyhole style needs. ``tests/test_contours.py`` fills the traced
loops back and checks the mask comes out identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from oncoseg_node.rtstruct.staircase import straighten

# Slices framed and compared at a time by the edge finder: small enough to
# stay in cache, large enough that numpy's per-call overhead does not show.
SLAB_BYTES = 1 << 21
# Voxels traced at a time: the edge arrays of a body's 400 slices were 122 MiB.
TRACE_VOXELS = 1 << 23

# Boundary edges are walked with the inside on the walker's right (y grows
# downwards in image space). A whole 3D mask is traced at once: every step
# below is an array operation over all slices, so Python does work per loop,
# never per edge or per pixel.


@dataclass(frozen=True)
class Region:
    """One 4-connected region of a slice: its outer loop and its holes (corner coords)."""

    outer: np.ndarray
    holes: tuple[np.ndarray, ...]
    pixels: int


def signed_area(loop: np.ndarray) -> float:
    """Shoelace area in pixel units; positive for outer loops, negative for holes."""
    x, y = loop[:, 0], loop[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _boundary_edges(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every boundary edge of a (z, y, x) mask: slice, start corner (x, y) and direction.

    The mask is framed by one outside pixel on every side of each slice, so
    that neighbours along x and along y are a fixed distance apart in the
    flat array: two contiguous comparisons find every edge, borders
    included, and a pair never spans two rows or two slices with a
    difference. Slabs of a few slices are framed and compared at a time, so
    the temporaries stay small (a whole body's framed copy and comparisons
    were most of the tracer's time, spent faulting in fresh pages); the edges
    come out in the order one pass over the whole volume would give.
    """
    depth, height, width = mask.shape
    row_length, plane = width + 2, (height + 2) * (width + 2)
    step = max(1, SLAB_BYTES // plane)
    framed = np.zeros((min(step, depth), height + 2, width + 2), dtype=bool)
    # four groups (x-neighbours inside first / second, y-neighbours likewise), each
    # in flat order: slab by slab, concatenated per group
    groups: list[tuple[list, list, list]] = [([], [], []) for _ in range(4)]

    def add(first: np.ndarray, flat: np.ndarray, z_offset: int, kind: int,
            inside_first: tuple[int, int, tuple[int, int]],
            inside_second: tuple[int, int, tuple[int, int]]) -> None:
        """Edges after flat pixels ``first``: start offset and direction by which side is in."""
        z, rest = np.divmod(first, plane)
        row, col = np.divmod(rest, row_length)  # framed coordinates = corner coordinates
        first_in = flat[first]
        for group, selected, (dx, dy, direction) in (
                (groups[kind], first_in, inside_first),
                (groups[kind + 1], ~first_in, inside_second)):
            group[0].append(z[selected] + z_offset)
            group[1].append(np.stack([col[selected] + dx, row[selected] + dy], axis=1))
            group[2].append(np.broadcast_to(np.array(direction), (int(selected.sum()), 2)))

    for z0 in range(0, depth, step):
        slab = mask[z0:z0 + step]
        frame = framed[:len(slab)]
        frame[:, 1:-1, 1:-1] = slab
        flat = frame.ravel()
        # Pixel (row r, column c) of the framed slice spans corners x in [c, c + 1],
        # y in [r, r + 1]. Between columns c and c + 1: the right edge of an
        # inside pixel on the left walks +y from (c + 1, r), the left edge of one
        # on the right walks -y from (c + 1, r + 1).
        add(np.flatnonzero(flat[1:] != flat[:-1]), flat, z0, 0, (1, 0, (0, 1)),
            (1, 1, (0, -1)))
        # Between rows r and r + 1: the bottom edge of an inside pixel above walks
        # -x from (c + 1, r + 1), the top edge of one below walks +x from (c, r + 1).
        add(np.flatnonzero(flat[row_length:] != flat[:-row_length]), flat, z0, 2,
            (1, 1, (-1, 0)), (0, 1, (1, 0)))
    return (np.concatenate([part for group in groups for part in group[0]]),
            np.concatenate([part for group in groups for part in group[1]]),
            np.concatenate([part for group in groups for part in group[2]]))


def _successors(slices: np.ndarray, starts: np.ndarray, dirs: np.ndarray,
                shape: tuple[int, int]) -> np.ndarray:
    """For each edge, the edge that continues its loop.

    Every corner has one outgoing edge, except where two regions touch only
    diagonally: there the walker turns towards the inside (right), so the
    regions stay separate loops.
    """
    corners_y, corners_x = shape[0] + 1, shape[1] + 1

    def key(points: np.ndarray) -> np.ndarray:
        return (slices * corners_y + points[:, 1]) * corners_x + points[:, 0]

    key_start, key_end = key(starts), key(starts + dirs)
    order = np.argsort(key_start, kind="stable")
    sorted_keys = key_start[order]
    pos = np.searchsorted(sorted_keys, key_end)
    nxt = order[pos]
    second = np.minimum(pos + 1, len(order) - 1)
    pinch = (sorted_keys[second] == key_end) & (second != pos)
    if pinch.any():
        right = np.stack([-dirs[:, 1], dirs[:, 0]], axis=1)
        alternative = order[second]
        take_alt = pinch & np.all(dirs[alternative] == right, axis=1)
        nxt = np.where(take_alt, alternative, nxt)
    return nxt


def _loop_order(nxt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split the successor permutation into loops, by pointer doubling.

    Returns the edges in loop order, each loop's first position in that
    order and each loop's leader (its lowest edge index, where it starts).
    Cost is O(n log L) array work for loops of at most L edges.
    """
    n = len(nxt)
    index = np.arange(n)
    # leader: the lowest edge index on each loop; the minimum over a window
    # of 2^k successors doubles its window each round and stops changing
    # once the window covers the loop.
    leader, jump = index, nxt
    while True:
        wider = np.minimum(leader, leader[jump])
        if np.array_equal(wider, leader):
            break
        leader, jump = wider, jump[jump]
    # rank: steps from the leader along the loop (list ranking, walking
    # predecessors, with each leader's link cut).
    is_leader = leader == index
    previous = np.empty_like(nxt)
    previous[nxt] = index
    rank = (~is_leader).astype(np.int64)
    back = np.where(is_leader, index, previous)
    while not is_leader[back].all():
        rank = rank + rank[back]
        back = back[back]
    sizes = np.bincount(leader, minlength=n)
    offsets = np.cumsum(sizes) - sizes
    order = np.empty_like(nxt)
    order[offsets[leader] + rank] = index
    leaders = np.flatnonzero(sizes)
    return order, offsets[leaders], leaders


def _inside(point: np.ndarray, start: np.ndarray, end: np.ndarray) -> bool:
    """Even-odd test of a pixel centre against a loop's edges (``start`` -> ``end`` vertices).

    Only vertical edges cross a horizontal ray, and a pixel centre's y is
    never a corner's, so no crossing is ambiguous.
    """
    x0, y0, x1, y1 = start[:, 0], start[:, 1], end[:, 0], end[:, 1]
    crosses = (x0 == x1) & ((y0 < point[1]) != (y1 < point[1])) & (x0 > point[0])
    return bool(np.count_nonzero(crosses) % 2)


def _words(mask: np.ndarray) -> np.ndarray | None:
    """Each slice of a C-contiguous bool mask as 64-bit words, or None when it does not divide.

    Reductions over whole slices (is anything there, where) then touch an
    eighth of the elements: for 30 ROIs over 150 slices of 512 x 512 that is
    most of the tracer's time otherwise.
    """
    plane = mask.shape[1] * mask.shape[2]
    if plane % 8 or not mask.flags.c_contiguous:
        return None
    return mask.reshape(mask.shape[0], plane).view(np.uint64)


def _any_per_slice(mask: np.ndarray) -> np.ndarray:
    words = _words(mask)
    return np.asarray(mask.any(axis=(1, 2)) if words is None else words.any(axis=1))


def _footprint(mask: np.ndarray) -> np.ndarray:
    """The union of a mask's slices, (y, x)."""
    words = _words(mask)
    if words is None:
        return np.any(mask, axis=0)
    union = np.bitwise_or.reduce(words, axis=0)
    return union.view(np.bool_).reshape(mask.shape[1:])


def trace_volume(mask: np.ndarray, min_pixels: int = 1, *, straight: bool = False,
                 origin: tuple[int, int, int] = (0, 0, 0)) -> dict[int, list[Region]]:
    """Regions of every slice of a (z, y, x) mask with their outer loop and holes.

    ``straight`` returns the loops with their staircases straightened
    (:mod:`oncoseg_node.rtstruct.staircase`): fewer points, the same pixels.
    ``origin`` is the grid index (z, y, x) of ``mask[0, 0, 0]`` when ``mask``
    is a crop of a larger grid: keys and corners are then the grid's.

    Keys are slice indices with at least one region of ``min_pixels`` or
    more; coordinates are corner coordinates of the slice. Each 4-connected
    region has exactly one loop with positive area (its outer boundary); a
    hole belongs to the smallest outer loop around the region pixel beside it.
    """
    mask = np.asarray(mask, dtype=bool)
    occupied = np.flatnonzero(_any_per_slice(mask))
    if occupied.size == 0:
        return {}
    # Loops never cross slices: a few slices traced at a time give the same
    # loops, and edge arrays (~175 bytes an edge) the size of a slab's boundary.
    first, last = int(occupied[0]), int(occupied[-1]) + 1
    step = max(1, TRACE_VOXELS // max(1, mask.shape[1] * mask.shape[2]))
    regions: dict[int, list[Region]] = {}
    for z in range(first, last, step):
        regions.update(_trace_slab(mask[z:min(z + step, last)], min_pixels, straight,
                                   (origin[0] + z, origin[1], origin[2])))
    return regions


def _trace_slab(mask: np.ndarray, min_pixels: int, straight: bool,
                origin: tuple[int, int, int]) -> dict[int, list[Region]]:
    """:func:`trace_volume` of a few slices at once (the edge arrays' extent)."""
    occupied = np.flatnonzero(_any_per_slice(mask))
    if occupied.size == 0:
        return {}
    z0, z1 = int(occupied[0]), int(occupied[-1])
    oz, oy, ox = origin
    footprint = _footprint(mask[z0:z1 + 1])
    rows, cols = np.flatnonzero(footprint.any(axis=1)), np.flatnonzero(footprint.any(axis=0))
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    crop = mask[z0:z1 + 1, r0:r1 + 1, c0:c1 + 1]
    slices, starts, dirs = _boundary_edges(crop)
    nxt = _successors(slices, starts, dirs, (crop.shape[1] + 2, crop.shape[2] + 2))
    order, loop_starts, leaders = _loop_order(nxt)
    # Only corners where the boundary turns are vertices.
    previous = np.empty_like(nxt)
    previous[nxt] = np.arange(len(nxt))
    turning = np.any(dirs != dirs[previous], axis=1)[order]
    counts = np.add.reduceat(turning.astype(np.int64), loop_starts)
    # framed crop corners -> the grid's corners
    shift = np.array([c0 - 1 + ox, r0 - 1 + oy])
    vertices = (starts[order[turning]] + shift).astype(np.float64)
    ends = np.cumsum(counts)
    firsts = ends - counts
    # Shoelace area of every loop at once: each vertex's successor wraps
    # to its loop's first vertex.
    successor = np.arange(1, len(vertices) + 1)
    successor[ends - 1] = firsts
    x, y = vertices[:, 0], vertices[:, 1]
    areas = 0.5 * np.add.reduceat(x * y[successor] - x[successor] * y, firsts)
    # Raster order of regions: by the top-left corner of their first pixel,
    # the lowest (y, x) vertex of their outer loop.
    top = np.minimum.reduceat(y, firsts)
    left = np.minimum.reduceat(np.where(y == np.repeat(top, counts), x, np.inf), firsts)
    # The pixel on the inside of each loop's first edge (inside is on the right).
    right = np.stack([-dirs[leaders, 1], dirs[leaders, 0]], axis=1)
    beside = starts[leaders] + shift + 0.5 * (dirs[leaders] + right)
    loop_slices = (slices[leaders] + z0 + oz).tolist()

    # Per slice: outer loops (positive area) smallest first, each with its holes.
    outers: dict[int, list[list]] = {}
    for k in np.flatnonzero(areas > 0).tolist():
        outers.setdefault(loop_slices[k], []).append([k, []])
    for candidates in outers.values():
        candidates.sort(key=lambda item: areas[item[0]])
    for k in np.flatnonzero(areas < 0).tolist():
        candidates = outers[loop_slices[k]]
        owner = candidates[0] if len(candidates) == 1 else next(
            c for c in candidates
            if _inside(beside[k], vertices[firsts[c[0]]:ends[c[0]]],
                       vertices[successor[firsts[c[0]]:ends[c[0]]]]))
        owner[1].append(k)

    shown, shown_ends = vertices, ends
    if straight:
        shown, shown_counts = straighten(vertices, counts)
        shown_ends = np.cumsum(shown_counts)
    shown_firsts = np.concatenate([[0], shown_ends[:-1]])

    def loop(k: int) -> np.ndarray:
        return shown[shown_firsts[k]:shown_ends[k]]

    regions: dict[int, list[Region]] = {}
    for z in sorted(outers):
        kept = [Region(loop(k), tuple(loop(h) for h in holes), pixels)
                for k, holes in sorted(outers[z], key=lambda c: (top[c[0]], left[c[0]]))
                if (pixels := round(areas[k] + sum(areas[h] for h in holes))) >= min_pixels]
        if kept:
            regions[z] = kept
    return regions


def trace_regions(mask: np.ndarray, min_pixels: int = 1) -> list[Region]:
    """Regions of a 2D mask with their outer loop and holes, in corner coordinates."""
    return trace_volume(np.asarray(mask, dtype=bool)[None], min_pixels).get(0, [])


def keyhole(outer: np.ndarray, holes: tuple[np.ndarray, ...]) -> np.ndarray:
    """Join each hole to the outer loop by a zero-width cut at their closest vertices.

    The result is one loop whose even-odd and nonzero fills both equal the
    region with its holes, for planning systems that read one contour per
    region.
    """
    if not holes:
        return outer
    merged = outer
    for hole in sorted(holes, key=lambda h: -abs(signed_area(h))):
        # Nearest merged vertex to each hole vertex, then the closest pair.
        distance, nearest = cKDTree(merged).query(hole)
        j = int(distance.argmin())
        i = int(nearest[j])
        merged = np.concatenate([
            merged[:i + 1], hole[j:], hole[:j + 1], merged[i:],
        ])
    return merged


def corners_to_index(vertices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) as fractional DICOM pixel indices of corner vertices."""
    return vertices[:, 1] - 0.5, vertices[:, 0] - 0.5


def fill_polygons(polygons: list[np.ndarray], shape: tuple[int, int],
                  out: np.ndarray | None = None,
                  origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Even-odd fill of polygons given as fractional (row, col) index arrays, shape (n, 2).

    A pixel is inside when its centre is; contours nested inside another on
    the same slice are holes (the convention of every planning system).
    ``out``, when given, is a zeroed boolean slice of ``shape`` filled in place
    (a volume's slice, so a structure set is rasterised without a copy per slice).
    ``origin`` is the (row, column) of ``out[0, 0]`` when it is a window of a
    larger slice: the crossings are computed in the slice's own indices, so a
    window holds exactly what the whole slice would.
    """
    height, width = shape
    row0, col0 = origin
    rows, cols = row0 + height, col0 + width  # the window's ends in slice indices
    if out is None:
        out = np.zeros(shape, dtype=bool)
    if not polygons:
        return out
    y0 = np.concatenate([p[:, 0] for p in polygons]).astype(np.float64)
    x0 = np.concatenate([p[:, 1] for p in polygons]).astype(np.float64)
    y1 = np.concatenate([np.roll(p[:, 0], -1) for p in polygons]).astype(np.float64)
    x1 = np.concatenate([np.roll(p[:, 1], -1) for p in polygons]).astype(np.float64)
    lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
    # rows whose centre y lies in [lo, hi): a vertex shared by two edges is counted once
    first = np.maximum(np.ceil(lo), row0).astype(np.int64)
    last = np.minimum(np.ceil(hi) - 1, rows - 1).astype(np.int64)
    keep = (hi > lo) & (first <= last)
    first, last = first[keep], last[keep]
    y0, x0, y1, x1 = y0[keep], x0[keep], y1[keep], x1[keep]
    counts = last - first + 1
    edge = np.repeat(np.arange(len(first)), counts)
    row = first[edge] + (np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts,
                                                                  counts))
    x = x0[edge] + (row - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
    # a crossing at x flips every pixel whose centre column c satisfies x <= c
    start = (np.clip(np.ceil(x), col0, cols) - col0).astype(np.int64)
    if not len(row):
        return out
    top, bottom = int(row.min()), int(row.max()) + 1  # only the rows the polygons cross
    toggles = np.zeros((bottom - top, width + 1), dtype=np.int32)
    np.add.at(toggles, (row - top, start), 1)
    out[top - row0:bottom - row0] = (np.cumsum(toggles[:, :width], axis=1) & 1).astype(bool)
    return out
