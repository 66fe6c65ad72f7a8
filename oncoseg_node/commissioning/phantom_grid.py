"""Sampling analytic shapes on one CT slice, and the patient and scan they describe.

Shapes are given in DICOM patient coordinates (LPS: +x toward the patient's
left, +y posterior, +z toward the head) and evaluated at the voxel centres of
one slice. ``Variant`` holds what the phantom varies between patients and
scanners, so tests can check that an engine is not tuned to one of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Variant:
    """One patient and scanner: sizes, densities, noise, devices and pose.

    ``marrow_hu`` is trabecular bone (100-300 HU in adults), ``texture_hu``
    the amplitude of its trabecular texture, ``cortex_hu`` and ``cortex_mm``
    the cortical shell; ``contrast_hu`` is iodine in the aorta and bowel
    (0: unenhanced); ``arms`` is ``side`` (beside the body), ``up`` (above
    the head: only the upper arms at the top of a thorax) or ``none``;
    ``couch`` is ``flat`` or ``curved``; ``mattress_mm`` of foam lies on it
    (0: the patient lies on the couch shell); ``metal`` adds a port in the
    chest wall and a hip prosthesis.
    """

    size: float = 1.0
    marrow_hu: float = 200.0
    texture_hu: float = 40.0
    cortex_hu: float = 700.0
    cortex_mm: float = 1.5
    noise_sd: float = 15.0
    contrast_hu: float = 300.0
    arms: str = "side"
    arm_gap_mm: float = 8.0
    couch: str = "curved"
    mattress_mm: float = 20.0
    metal: bool = True


VARIANTS: dict[str, Variant] = {
    "standard": Variant(),
    # Thin, osteoporotic, unenhanced arterial phase barely visible, on a flat couch.
    "slim": Variant(size=0.9, marrow_hu=110.0, texture_hu=30.0, cortex_hu=600.0,
                    cortex_mm=1.0, noise_sd=10.0, contrast_hu=180.0, arms="up",
                    couch="flat", mattress_mm=0.0, metal=False),
    # Large, dense bone, strong contrast, noisy, arms touching the body and cut by the FOV.
    "large": Variant(size=1.15, marrow_hu=290.0, texture_hu=60.0, cortex_hu=950.0,
                     cortex_mm=2.0, noise_sd=25.0, contrast_hu=420.0, arms="side",
                     arm_gap_mm=-10.0, couch="curved", mattress_mm=40.0, metal=True),
}


class Slice:
    """Patient coordinates of one slice's voxel centres, kept separable.

    Every supported orientation has its row direction along patient x and its
    column direction in the y-z plane (gantry tilt rotates it about x), so x
    depends only on the column and y, z only on the row. Shapes are evaluated
    on those vectors inside their bounding box and broadcast, which is what
    makes a 512x512 slice cost a few milliseconds.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> None:
        self.x, self.y, self.z = x, y, z
        self.shape = (len(y), len(x))
        self.z_range = (float(z.min()), float(z.max()))

    def _box(self, rows_ok: np.ndarray, x_lo: float, x_hi: float
             ) -> tuple[slice, slice] | None:
        rows = np.flatnonzero(rows_ok)
        cols = np.flatnonzero((self.x >= x_lo) & (self.x <= x_hi))
        if rows.size == 0 or cols.size == 0:
            return None
        return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)

    def ellipsoid(self, c: Sequence[float], r: Sequence[float]) -> np.ndarray:
        """Ellipsoid; an infinite z radius gives an elliptic cylinder along z."""
        out = np.zeros(self.shape, dtype=bool)
        dyz = ((self.y - c[1]) / r[1]) ** 2 + ((self.z - c[2]) / r[2]) ** 2
        box = self._box(dyz <= 1.0, c[0] - r[0], c[0] + r[0])
        if box is not None:
            rs, cs = box
            out[rs, cs] = dyz[rs, None] + ((self.x[None, cs] - c[0]) / r[0]) ** 2 <= 1.0
        return out

    def ellipse(self, cx: float, cy: float, a: float, b: float,
                z: tuple[float, float] = (-np.inf, np.inf)) -> np.ndarray:
        """Elliptic cylinder along z, optionally cut to ``z`` (lo, hi)."""
        out = self.ellipsoid((cx, cy, 0.0), (a, b, np.inf))
        out &= ((self.z >= z[0]) & (self.z <= z[1]))[:, None]
        return out

    def tube(self, p0: Sequence[float], p1: Sequence[float], radius: float,
             out: np.ndarray | None = None) -> np.ndarray:
        """Round tube (axial cross-section a disc) whose centre runs p0 -> p1, linear in z.

        With ``out`` the tube is added to that mask (many small tubes, one array).
        """
        if out is None:
            out = np.zeros(self.shape, dtype=bool)
        z_lo, z_hi = sorted((p0[2], p1[2]))
        if z_hi < self.z_range[0] or z_lo > self.z_range[1]:
            return out
        t = (self.z - p0[2]) / (p1[2] - p0[2])
        box = self._box((self.z >= z_lo) & (self.z <= z_hi),
                        min(p0[0], p1[0]) - radius, max(p0[0], p1[0]) + radius)
        if box is not None:
            rs, cs = box
            cx = p0[0] + t[rs] * (p1[0] - p0[0])
            cy = p0[1] + t[rs] * (p1[1] - p0[1])
            out[rs, cs] |= ((self.x[None, cs] - cx[:, None]) ** 2
                            + ((self.y[rs] - cy) ** 2)[:, None]) <= radius * radius
        return out

    def rows(self, condition: np.ndarray) -> np.ndarray:
        return condition[:, None]

    def cols(self, condition: np.ndarray) -> np.ndarray:
        return condition[None, :]



@dataclass(frozen=True)
class Frame:
    """Where the anatomy sits: scan centre and half length along z, couch side, variant."""

    zc: float
    zh: float
    down: float  # +1: couch on the posterior side (supine); -1: anterior (prone)
    vessels: tuple[tuple[tuple[float, ...], tuple[float, ...], float], ...]
    v: Variant = Variant()

    def zn(self, g: Slice) -> np.ndarray:
        return (g.z - self.zc) / self.zh

    def z(self, fraction: float) -> float:
        return self.zc + fraction * self.zh
