"""How far apart two display colours look: CIE 1976 colour difference in CIELAB.

A reviewer tells structures apart by colour alone on a busy slice, so the
protocols' colours are checked pairwise (see :func:`close_pairs`): a
difference under about 25 reads as "the same blue" on a planning-system
screen, and a structure drawn on bone must not be near-white.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from oncoseg_node.contouring.protocols import ProtocolSet

# sRGB (D65) to CIE XYZ, and the D65 white point
_RGB_TO_XYZ = np.array([[0.4124, 0.3576, 0.1805],
                        [0.2126, 0.7152, 0.0722],
                        [0.0193, 0.1192, 0.9505]])
_WHITE = np.array([0.95047, 1.0, 1.08883])
MIN_DISTINCT_DELTA_E = 25.0
# Bone in a soft-tissue or bone window is drawn near-white.
BONE_DISPLAY = (255, 255, 255)


def to_lab(rgb: Sequence[int]) -> np.ndarray:
    """CIELAB (L*, a*, b*) of an 8-bit sRGB colour."""
    c = np.asarray(rgb, dtype=float) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = _RGB_TO_XYZ @ linear / _WHITE
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
    return np.array([116.0 * f[1] - 16.0, 500.0 * (f[0] - f[1]), 200.0 * (f[1] - f[2])])


def delta_e(a: Sequence[int], b: Sequence[int]) -> float:
    """CIE76 colour difference between two 8-bit sRGB colours (about 2.3 is just noticeable)."""
    return float(np.linalg.norm(to_lab(a) - to_lab(b)))


def close_pairs(named: Sequence[tuple[str, Sequence[int]]],
                threshold: float = MIN_DISTINCT_DELTA_E) -> list[tuple[str, str, float]]:
    """Every pair of named colours closer than ``threshold``, as (name, name, difference)."""
    out = []
    for (name_a, a), (name_b, b) in itertools.combinations(named, 2):
        d = delta_e(a, b)
        if d < threshold:
            out.append((name_a, name_b, round(d, 1)))
    return out


def color_warnings(protocols: ProtocolSet) -> list[str]:
    """One line per pair of structures in a protocol whose colours look alike."""
    lines = []
    for protocol in protocols.protocols:
        for a, b, d in close_pairs([(s.name, s.color) for s in protocol.structures]):
            lines.append(f"protocols.{protocol.name}: {a} and {b} look alike on screen (colour "
                         f"difference {d} < {MIN_DISTINCT_DELTA_E:g}); give one another colour")
    return lines
