"""Mask clean-up the physicists configure per structure.

Fill holes, smooth, drop small 3D islands, keep the N largest components,
drop small pieces of a slice: the rules of a protocol's ``postprocess``,
run on the mask's box. Applied to every engine's output, so a protocol
behaves the same whichever engine contours the structure.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from oncoseg_node.contouring.engines.classical.blocks import Block, box_in
from oncoseg_node.contouring.engines.classical.labels import IN_PLANE, components, largest
from oncoseg_node.contouring.engines.classical.morphology import fill_holes
from oncoseg_node.contouring.protocols import PostProcess
from oncoseg_node.contouring.volume import Volume

GAUSS_TRUNCATE = 4.0  # scipy's default: the kernel reaches 4 sigma


def _has_rules(rules: PostProcess) -> bool:
    return bool(rules.fill_holes or rules.smoothing_mm > 0 or rules.min_island_cc > 0
                or rules.keep_components or rules.min_slice_island_mm2 > 0)


def postprocess(volume: Volume, mask: np.ndarray, rules: PostProcess) -> np.ndarray:
    """Fill holes, smooth, drop small 3D islands, keep the N largest, drop slice specks."""
    if not _has_rules(rules) or not mask.any():
        return mask
    block = postprocess_block(volume, Block.whole(mask), rules)
    return np.zeros(mask.shape, dtype=bool) if block is None else block.full(mask.shape)


def postprocess_block(volume: Volume, block: Block | None, rules: PostProcess) -> Block | None:
    """:func:`postprocess` on a mask held as a block; None when nothing is left.

    The work runs on the mask's bounding box, grown along each axis by the
    smoothing kernel's reach (scipy's gaussian truncates at 4 sigma): holes
    are per slice and bounded by the mask, islands are counted whole, and
    beyond that reach the smoothed mask is empty, so the result is the same
    as on the whole volume.
    """
    if block is None or not block.array.any():
        return None
    if not _has_rules(rules):
        return block
    sigma = None
    pads: tuple[int, ...] = (0, 0, 0)
    if rules.smoothing_mm > 0:
        spacing_z = (float(np.median(np.diff(volume.slice_offsets)))
                     if volume.shape[0] > 1 else 1.0)
        sigma = [rules.smoothing_mm / max(spacing_z, 1e-6),
                 rules.smoothing_mm / volume.pixel_spacing[0],
                 rules.smoothing_mm / volume.pixel_spacing[1]]
        pads = tuple(int(GAUSS_TRUNCATE * s + 0.5) for s in sigma)
    box = box_in(block.array, block.box, volume.shape, pad=pads)
    assert box is not None  # the mask has voxels
    out = block.within(box)
    if rules.fill_holes:
        out = fill_holes(out, out=out)
    if sigma is not None:
        out = ndimage.gaussian_filter(out.astype(np.float32), sigma,
                                      truncate=GAUSS_TRUNCATE) >= 0.5
    if rules.min_island_cc > 0 or rules.keep_components:
        parts = components(out)
        if parts.count:
            sizes = parts.cc(volume, box[0].start)
            keep = sizes >= rules.min_island_cc
            if rules.keep_components:
                keep &= largest(sizes, rules.keep_components)
            out = parts.mask(keep, out=out)
    if rules.min_slice_island_mm2 > 0:
        out = drop_slice_islands(volume, out, rules.min_slice_island_mm2)
    return Block(box, out) if out.any() else None


def drop_slice_islands(volume: Volume, mask: np.ndarray, min_mm2: float) -> np.ndarray:
    """Remove the 4-connected pieces of each slice whose area is under ``min_mm2``."""
    pieces = components(mask, IN_PLANE)
    if not pieces.count:
        return mask
    return pieces.mask(pieces.mm2(volume) >= min_mm2)
