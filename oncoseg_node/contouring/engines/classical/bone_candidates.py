"""Candidate bone (the skeleton's steps 1 and 2): the half-maximum edge, metal left out.

Candidate bone is denser than LOW_HU and than half way between soft tissue
and the densest voxel within PEAK_MM: a dense cortex's blur does not widen
it, a thin rib blended with soft tissue over a 3 mm slice is still found at
its own, lower, peak. Metal (denser than any bone) and its blur are removed.
"""

from __future__ import annotations

import numpy as np

from oncoseg_node.contouring.engines.classical.blocks import Block
from oncoseg_node.contouring.engines.classical.boxed import BoxedVolume
from oncoseg_node.contouring.engines.classical.morphology import dilate, radius_px, shift_in_place
from oncoseg_node.contouring.engines.classical.slabs import SLAB, each_slab

LOW_HU = 120.0         # above unenhanced soft tissue with noise; below any cortex blend
SEED_HU = 250.0        # confident bone: a cortex, even blended over a 3 mm slice
SOFT_HU = 40.0         # what bone borders; its edge lies half way to the bone's peak
PEAK_MM = 2.0
Z_PEAK_WEIGHT = 0.75   # how much of the neighbouring slices' peak counts
METAL_HU = 2500.0      # denser than cortical bone (<= ~2000 HU)
METAL_MARGIN_MM = 2.0  # the blur (and blooming) around metal


def _local_max(hu: np.ndarray, ry: int, rx: int) -> np.ndarray:
    """In-plane maximum over a (2 ry + 1) x (2 rx + 1) window, cut at the image's edge."""
    out = hu.copy()
    shift_in_place(out, max(ry, 1), 1, np.maximum)
    shift_in_place(out, max(rx, 1), 2, np.maximum)
    return out


def float_type(hu: np.ndarray) -> np.dtype:
    """The float type arithmetic on ``hu`` needs: float32 for int16 HU, else its own."""
    return np.result_type(hu.dtype, np.float32)


def half_maximum(bone: BoxedVolume, body: Block) -> np.ndarray:
    """Steps 1 and 2 on the ``bone`` box: candidate bone, a slab of slices at a time.

    Each slab's peaks need the slice on either side (they count along z), so
    a slab is computed with one slice of margin; the peaks never exist for the
    whole box at once, nor does the body on it.
    """
    ry, rx = radius_px(bone, PEAK_MM)
    margin = radius_px(bone, METAL_MARGIN_MM)
    hu = bone.hu
    floats = float_type(hu)
    n = hu.shape[0]
    cand = np.empty(hu.shape, dtype=bool)

    def step(z0: int) -> None:
        z1 = min(z0 + SLAB, n)
        first, stop = max(z0 - 1, 0), min(z1 + 1, n)
        peak = _local_max(hu[first:stop], ry, rx).astype(floats, copy=False)
        # And along z: a rib crossing a slice obliquely fills the slices beside its
        # centre in part; their half maximum is that of the slice where it is whole.
        # (The margin slices come out wrong, lacking their own neighbours: unused.)
        peak[1:] = np.maximum(peak[1:], peak[:-1] * Z_PEAK_WEIGHT)
        peak[:-1] = np.maximum(peak[:-1], peak[1:] * Z_PEAK_WEIGHT)
        half = peak[z0 - first:z1 - first]
        half += SOFT_HU
        half /= 2
        part = hu[z0:z1]
        np.greater(part, LOW_HU, out=cand[z0:z1])
        cand[z0:z1] &= part > half
        cand[z0:z1] &= body.within(bone.rows(z0, z1))
        metal = part > METAL_HU
        if metal.any():  # its blur is in-plane: a slab's own metal is all it reaches
            cand[z0:z1] &= ~dilate(metal, *margin)

    each_slab(step, range(0, n, SLAB))
    return cand
