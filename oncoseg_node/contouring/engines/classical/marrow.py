"""Marrow: what the bones' shells enclose, judged by the density inside.

A shell's cavities on each axial slice are marrow when small and denser than
MARROW_HU inside (trabecular marrow), or small and of fat density away from
the canal (a long bone's shaft); what the shell encloses on both coronal and
sagittal planes is marrow too where it is dense (a vertebral body whose axial
ring is open, closed by its endplates). Larger enclosed regions are body
cavities (the pelvic inlet, the skull) and are never filled.

Masks are ``(z, y, x)`` on the bone box.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from oncoseg_node.contouring.engines.classical.boxed import BoxedVolume
from oncoseg_node.contouring.engines.classical.labels import IN_PLANE, LabelStats, compact_label
from oncoseg_node.contouring.engines.classical.morphology import (
    BLUR_PX,
    dilate,
    erode,
    fill_holes,
    radius_px,
)
from oncoseg_node.contouring.engines.classical.slabs import SLAB, each_slab
from oncoseg_node.contouring.engines.classical.voxels import PackedMask

BRIDGE_MM = 2.0        # gaps in a cortex up to twice this are closed before filling
MARROW_HU = 60.0       # trabecular marrow (100-300 HU) stays above, the canal below
FATTY_HU = (-200.0, -20.0)  # fatty marrow of a long bone's shaft
MARROW_MM2 = 3000.0    # larger enclosed regions are body cavities (pelvic inlet, skull)
FATTY_MM2 = 800.0      # fatty marrow cavities are small; a fat-filled pelvis is not one
MIXED_HU = 25.0        # mixed (red and yellow) marrow has fat in it: below muscle's 40-60
MIXED_MM2 = 400.0      # a shaft's cavity of mixed marrow (a humerus's is about 200 mm^2)
ROUND_CAVITY_FILL = 0.6  # an ellipse fills 0.79 of its bounding box, a crescent far less
ROUND_CAVITY_ASPECT = 0.5  # a shaft's cavity is about as wide as it is deep


class Cavities(NamedTuple):
    """Regions a shell encloses on each slice, held as their voxels (a few percent of the box)."""

    stats: LabelStats  # each region's voxels, numbered slice by slice
    mean: np.ndarray   # mean HU inside, per region
    area: np.ndarray   # mm^2, per region


def cavities(bone: BoxedVolume, shell: np.ndarray) -> Cavities:
    """Regions ``shell`` (on the ``bone`` box) encloses on each slice, with their mean HU
    inside and area.

    Every step is in-plane, so it runs a slab of slices at a time (each slab's
    closing, filling and labels stay in cache); numbering the slabs' regions on
    from one another numbers them as one labelling of the box would.
    """
    # Gaps in a thin shell (where a rib leaves the slab obliquely) are bridged.
    ry, rx = (max(r, 1) for r in radius_px(bone, BRIDGE_MM))
    plane = shell.shape[1] * shell.shape[2]

    def step(z: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        part = shell[z:z + SLAB]
        holes = erode(dilate(part, ry, rx), ry, rx)
        holes |= part
        fill_holes(holes, out=holes)
        holes &= ~part
        labels, found = compact_label(holes, IN_PLANE)
        flat = np.flatnonzero(holes)
        # Judge a cavity by its inside: next to a dense cortex its rim is blurred toward bone.
        inner = erode(holes, BLUR_PX, BLUR_PX).ravel()[flat]
        return flat + z * plane, labels.ravel()[flat].astype(np.int64), inner, found

    flats, labs, inner = [], [], []
    count = 0
    for flat, lab, inside, found in each_slab(step, range(0, shell.shape[0], SLAB)):
        flats.append(flat)
        labs.append(lab + count)
        inner.append(inside)
        count += found
    stats = LabelStats.from_voxels(np.concatenate(flats), np.concatenate(labs), count)
    hu = bone.hu
    inside = stats.subset(np.concatenate(inner)).mean(hu)
    mean = np.where(np.isnan(inside), stats.mean(hu), inside)
    area = stats.size * bone.pixel_spacing[0] * bone.pixel_spacing[1]
    return Cavities(stats, mean, area)


def trabecular(cavities: Cavities, dense: PackedMask) -> np.ndarray:
    """Trabecular marrow: dense voxels in small cavities whose inside is denser than MARROW_HU.

    Voxel by voxel too, so neither the canal (CSF, cord and fat lie below
    MARROW_HU) nor soft tissue let in by the closing is taken.
    """
    stats, mean, area = cavities
    keep = np.concatenate([[False], (mean > MARROW_HU) & (area <= MARROW_MM2)])
    chosen = keep[stats.lab]
    chosen &= dense.at(stats.flat)
    out = np.zeros(dense.shape, dtype=bool)
    out.ravel()[stats.flat[chosen]] = True
    return out


def fatty(cavities: Cavities, canal: np.ndarray) -> np.ndarray:
    """Fatty marrow: small cavities of fat density (a long bone's shaft), not the canal."""
    stats, mean, area = cavities
    in_canal = stats.any(canal)
    fatty = (mean > FATTY_HU[0]) & (mean < FATTY_HU[1]) & (area <= FATTY_MM2)
    # Mixed marrow lies near water density, as soft tissue between two bones does: only a
    # small round cavity is a shaft's (the gap between a scapula and a rib is a crescent).
    mixed = (mean >= FATTY_HU[1]) & (mean <= MIXED_HU) & (area <= MIXED_MM2)
    if mixed.any():
        mixed &= _round(stats, np.concatenate([[False], mixed]), canal.shape)
    fatty = (fatty | mixed) & ~in_canal
    return stats.where(np.concatenate([[False], fatty]), canal.shape)


def _round(stats: LabelStats, which: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Per region (each on one slice): whether it is round, filling most of its in-plane
    bounding box and that box not much longer than wide (a strip or crescent is not).

    Only the regions ``which`` marks (indexed 0..count) are measured: the others,
    a body cavity among them, may hold millions of voxels.
    """
    if stats.count == 0:
        return np.zeros(0, dtype=bool)
    pick = which[stats.lab]
    lab = stats.lab[pick]
    _, rows, cols = np.unravel_index(stats.flat[pick], shape)
    count = stats.count + 1
    extent = []
    for where in (rows, cols):
        low = np.full(count, np.iinfo(np.int64).max)
        high = np.full(count, -1)
        np.minimum.at(low, lab, where)
        np.maximum.at(high, lab, where)
        extent.append(np.maximum(high - low + 1, 1)[1:])
    fill = stats.size / (extent[0] * extent[1])
    aspect = np.minimum(*extent) / np.maximum(*extent)
    return (fill >= ROUND_CAVITY_FILL) & (aspect >= ROUND_CAVITY_ASPECT)


def orthogonal_fill(ring: np.ndarray, marrow: np.ndarray, dense: PackedMask) -> np.ndarray:
    """Marrow enclosed by ``ring | marrow`` on both coronal and sagittal planes (voxels
    denser than MARROW_HU).

    Both: a plane tangent to a curved shell (the skull) cuts it in a ring that
    encloses soft tissue on one of them, never on both. The enclosing shell is
    made a slab at a time, never held whole.
    """
    out = np.logical_or(ring, marrow)
    np.logical_not(out, out=out)
    for z in range(0, out.shape[0], SLAB):
        out[z:z + SLAB] &= dense.slab(z, z + SLAB)
    for axis in (1, 2):  # coronal planes (z, x) at each row, sagittal planes (z, y) at each column

        def step(start: int, axis: int = axis) -> None:
            # A slab of planes at a time, made contiguous: never a transposed copy of it all.
            where = [slice(None)] * 3
            where[axis] = slice(start, start + SLAB)
            planes = np.moveaxis(ring[tuple(where)] | marrow[tuple(where)], axis, 0)
            planes = np.ascontiguousarray(planes)
            out[tuple(where)] &= np.moveaxis(fill_holes(planes), 0, axis)

        each_slab(step, range(0, ring.shape[axis], SLAB))
    return out
