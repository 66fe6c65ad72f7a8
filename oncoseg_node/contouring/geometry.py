"""The geometry gate: a series is contoured only if it is one sane volume.

Checked before any contouring, on headers alone: one frame of reference,
orientation, pixel spacing and matrix size; no gantry tilt (slice positions
must advance along the slice normal); no missing slice. Non-uniform but
regular spacing is allowed because every later stage maps each slice with
its own ImagePositionPatient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from oncoseg_node.errors import GeometryError

ORIENTATION_TOLERANCE = 1e-3
# A gap this many times larger than both neighbouring gaps is a missing slice,
# not a deliberate change of slice spacing (which is a step, not a spike).
MISSING_SLICE_RATIO = 1.5


@dataclass(frozen=True)
class GeometryReport:
    slices: int
    spacing_min_mm: float
    spacing_max_mm: float
    uniform: bool
    overridden: str | None = None  # the gate's finding an operator chose to accept


def _values(ds: Dataset, keyword: str) -> tuple[float, ...]:
    value = ds.get(keyword)
    if value is None:
        raise GeometryError(f"{keyword} missing in instance {ds.get('SOPInstanceUID', '?')}")
    return tuple(float(v) for v in value)


def check_series(datasets: Sequence[Dataset], *, spacing_tolerance_mm: float = 0.1
                 ) -> GeometryReport:
    """Raise :class:`GeometryError` naming the attribute when the series is unsafe."""
    if len(datasets) < 2:
        raise GeometryError(f"series has {len(datasets)} slice(s); at least 2 are needed")
    first = datasets[0]
    for keyword in ("FrameOfReferenceUID", "Rows", "Columns"):
        seen = {str(ds.get(keyword, "")) for ds in datasets}
        if len(seen) != 1:
            raise GeometryError(f"mixed {keyword} across the series: {sorted(seen)[:3]}")
    iop0 = np.array(_values(first, "ImageOrientationPatient"))
    ps0 = np.array(_values(first, "PixelSpacing"))
    for ds in datasets[1:]:
        if not np.allclose(_values(ds, "ImageOrientationPatient"), iop0,
                           atol=ORIENTATION_TOLERANCE):
            raise GeometryError("mixed ImageOrientationPatient across the series")
        if not np.allclose(_values(ds, "PixelSpacing"), ps0, atol=1e-4):
            raise GeometryError("mixed PixelSpacing across the series")
    normal = np.cross(iop0[:3], iop0[3:])
    positions = np.array([_values(ds, "ImagePositionPatient") for ds in datasets])
    order = np.argsort(positions @ normal)
    positions = positions[order]
    steps = np.diff(positions, axis=0)
    along = steps @ normal
    if np.any(along < spacing_tolerance_mm / 10):
        raise GeometryError("two slices share one position along the slice normal")
    across = np.linalg.norm(steps - along[:, None] * normal[None, :], axis=1)
    if np.any(across > spacing_tolerance_mm):
        angle = float(np.degrees(np.arctan2(across.max(), along[np.argmax(across)])))
        raise GeometryError(
            f"slices are sheared relative to the slice normal by {angle:.1f} degrees "
            "(gantry tilt): resample on the scanner or contour manually"
        )
    for i, gap in enumerate(along):
        before = along[i - 1] if i > 0 else None
        after = along[i + 1] if i + 1 < len(along) else None
        neighbours = [g for g in (before, after) if g is not None]
        if neighbours and all(gap > MISSING_SLICE_RATIO * g for g in neighbours):
            raise GeometryError(
                f"missing slice: gap of {gap:.2f} mm after slice {i + 1} where neighbours "
                f"are {min(neighbours):.2f} mm apart"
            )
    return GeometryReport(
        slices=len(datasets),
        spacing_min_mm=float(along.min()),
        spacing_max_mm=float(along.max()),
        uniform=bool(along.max() - along.min() <= spacing_tolerance_mm),
    )
