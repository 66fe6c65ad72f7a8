"""A boolean ``(z, y, x)`` mask held as its bounding box on the volume's grid.

A full mask of a 400 x 512 x 512 series is 100 MiB, yet most organs fill a
small box (canal, trachea, a lung): a protocol's results held as full arrays
dominate a job's memory. A crop keeps the box (one slice per axis, in grid
indices) and the boolean array inside it; everything downstream (volumes,
centroids, contour tracing, overlays) reads the crop and its offset.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

# Plain ``start:stop`` slices on (z, y, x), in grid indices: the one box type of
# every mask crop and of every box an engine works in.
Box = tuple[slice, slice, slice]

EMPTY_BOX: Box = (slice(0, 0), slice(0, 0), slice(0, 0))


def box_of(slices: Iterable[slice]) -> Box:
    """``slices`` (z, y, x) as a :data:`Box`; a tuple built from a comprehension is typed
    as of any length, so the count is checked here, once."""
    cuts = tuple(slices)
    if len(cuts) != 3:
        raise ValueError(f"a box is three slices (z, y, x); got {len(cuts)}")
    return cuts[0], cuts[1], cuts[2]


def whole_box(shape: Sequence[int]) -> Box:
    """The box of the whole grid of ``shape`` (z, y, x)."""
    return box_of(slice(0, n) for n in shape)


def _extent(any_along: np.ndarray | np.bool_) -> tuple[int, int]:
    hits = np.flatnonzero(any_along)
    return int(hits[0]), int(hits[-1]) + 1


@dataclass(frozen=True, eq=False)
class MaskCrop:
    """``array`` is the mask inside ``box`` of a grid of ``shape``; outside, all False.

    ``box`` holds plain ``start:stop`` slices in grid indices (z, y, x);
    ``array.shape`` equals the box's extent. An empty mask has an empty box.
    Build one with :meth:`of` (it finds the bounding box) unless the box is
    already known to be tight.
    """

    shape: tuple[int, int, int]
    box: Box
    array: np.ndarray

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or len(self.box) != 3:
            raise ValueError(f"a mask crop is 3-D (z, y, x); got shape {self.shape}")
        if self.array.dtype != np.bool_:
            raise ValueError(f"a mask crop is boolean, not {self.array.dtype}")
        extent = []
        for axis, (cut, size) in enumerate(zip(self.box, self.shape, strict=True)):
            if cut.step not in (None, 1) or not 0 <= cut.start <= cut.stop <= size:
                raise ValueError(f"box axis {axis} {cut} does not lie in 0..{size}")
            extent.append(cut.stop - cut.start)
        if tuple(extent) != self.array.shape:
            raise ValueError(f"crop array {self.array.shape} does not fill box {tuple(extent)}")

    @classmethod
    def of(cls, mask: np.ndarray, shape: tuple[int, ...] | None = None,
           origin: tuple[int, int, int] = (0, 0, 0)) -> MaskCrop:
        """The tight crop of ``mask``: a full mask, or a block of a grid of ``shape``.

        ``origin`` is the grid index of ``mask[0, 0, 0]`` when ``mask`` is a
        block (say an engine's working box); the crop is a copy, so the block
        or full array it came from can be freed.
        """
        mask = np.asarray(mask, dtype=bool)
        if mask.ndim != 3:
            raise ValueError(f"a mask is (z, y, x); got {mask.ndim} dimension(s)")
        grid = tuple(int(n) for n in (mask.shape if shape is None else shape))
        if len(grid) != 3:
            raise ValueError(f"a grid is (z, y, x); got shape {grid}")
        planes = mask.any(axis=(1, 2))
        if not planes.any():
            return cls((grid[0], grid[1], grid[2]), EMPTY_BOX, np.zeros((0, 0, 0), bool))
        z0, z1 = _extent(planes)
        inside = mask[z0:z1]
        y0, y1 = _extent(inside.any(axis=(0, 2)))
        x0, x1 = _extent(inside.any(axis=(0, 1)))
        oz, oy, ox = origin
        box: Box = (slice(oz + z0, oz + z1), slice(oy + y0, oy + y1), slice(ox + x0, ox + x1))
        return cls((grid[0], grid[1], grid[2]), box, inside[:, y0:y1, x0:x1].copy())

    @property
    def origin(self) -> tuple[int, int, int]:
        """Grid index (z, y, x) of ``array[0, 0, 0]``."""
        return self.box[0].start, self.box[1].start, self.box[2].start

    @property
    def empty(self) -> bool:
        return not bool(self.array.any())

    def count(self) -> int:
        """Number of True voxels."""
        return int(np.count_nonzero(self.array))

    def section(self, axis: int, index: int) -> np.ndarray:
        """The full-grid 2-D cut at grid ``index`` along ``axis`` (0 z, 1 y, 2 x)."""
        plane_shape = tuple(n for a, n in enumerate(self.shape) if a != axis)
        out = np.zeros(plane_shape, dtype=bool)
        cut = self.box[axis]
        if cut.start <= index < cut.stop:
            rest = tuple(c for a, c in enumerate(self.box) if a != axis)
            out[rest] = np.take(self.array, index - cut.start, axis=axis)
        return out

    def full(self) -> np.ndarray:
        """The whole ``(z, y, x)`` mask, allocated on each call.

        For tests and for commissioning metrics that need the full grid
        (surface distances); the delivery path reads the crop.
        """
        out = np.zeros(self.shape, dtype=bool)
        out[self.box] = self.array
        return out
