"""Mask clean-up the physicists configure per structure (``postprocess:`` in protocols).

Applied to every engine's output, so a protocol behaves the same whichever
engine contours the structure. Masks are ``(z, y, x)`` booleans.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..protocols import PostProcess
from ..volume import Volume


def _component_sizes_cc(volume: Volume, labels: np.ndarray, count: int) -> np.ndarray:
    voxel_cc = (volume.voxel_volume_mm3 / 1000.0)[:, None, None]
    return ndimage.sum_labels(np.broadcast_to(voxel_cc, labels.shape), labels,
                              index=np.arange(1, count + 1))


def postprocess(volume: Volume, mask: np.ndarray, rules: PostProcess) -> np.ndarray:
    """Fill holes, drop small islands, keep the N largest components, smooth."""
    if not mask.any():
        return mask
    out = mask
    if rules.fill_holes:
        out = np.stack([ndimage.binary_fill_holes(s) for s in out])
    if rules.smoothing_mm > 0:
        sigma = [rules.smoothing_mm / max(float(np.median(np.diff(volume.slice_offsets)))
                                          if volume.shape[0] > 1 else 1.0, 1e-6),
                 rules.smoothing_mm / volume.pixel_spacing[0],
                 rules.smoothing_mm / volume.pixel_spacing[1]]
        out = ndimage.gaussian_filter(out.astype(np.float32), sigma) >= 0.5
    if rules.min_island_cc > 0 or rules.keep_components:
        labels, count = ndimage.label(out)
        if count:
            sizes = _component_sizes_cc(volume, labels, count)
            keep = sizes >= rules.min_island_cc
            if rules.keep_components:
                ranked = np.argsort(sizes)[::-1][:rules.keep_components]
                largest = np.zeros(count, dtype=bool)
                largest[ranked] = True
                keep &= largest
            out = np.concatenate([[False], keep])[labels]
    return out
