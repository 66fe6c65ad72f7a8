"""The great vessels filled with iodine: found in the image, before bone is judged.

A contrast-filled aorta or cava is as dense as trabecular bone and, lying on
the spine, touches a vertebra's cortex. It is found from what a lumen is,
independent of the bone candidates (which a calcified plaque in its wall, as
dense as cortex, fragments): where the image, over a few pixels' neighbourhood,
is of iodine density (IODINE_HU) and no more spread than the image noise
(trabecular bone is textured, a cortex an edge), eroded by CORE_MM, a core
that is round, of a vessel's cross-section, and runs farther along the table
than a vertebral body is tall. The caller cuts what lies within reach of such a core and is no
denser than its iodine.

Masks are ``(z, y, x)`` on the bone box.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from oncoseg_node.contouring.engines.classical.bone_candidates import float_type
from oncoseg_node.contouring.engines.classical.boxed import BoxedVolume
from oncoseg_node.contouring.engines.classical.labels import LabelStats, compact_label
from oncoseg_node.contouring.engines.classical.morphology import erode, radius_px
from oncoseg_node.contouring.engines.classical.noise import image_noise
from oncoseg_node.contouring.engines.classical.slabs import each_slab
from oncoseg_node.contouring.mask_crop import Box
from oncoseg_node.contouring.volume import Volume

IODINE_HU = (150.0, 800.0)  # enhanced blood, portal-venous to arterial phase, smoothed
CORE_MM = 3.0          # what is left of a lumen once eroded this far
VESSEL_MM = 30.0       # a core this long along the table is a vessel, not a vertebra
VESSEL_CORE_MM2 = 30.0  # and this wide once eroded (the aorta, the cava)
ROUND_FILL = 0.35      # share of its bounding box a round cross-section fills
HOMOGENEOUS_NOISE = 1.5  # a lumen's spread is the noise's; trabecular bone's is more
WINDOW = 5             # pixels across the neighbourhood a lumen's spread is measured in
CHUNK = 4              # slices judged at a time: their float temporaries stay small


def _cores(bone: BoxedVolume, noise: float) -> np.ndarray:
    """Flat indices (on the box) of the lumens' cores: where the HU over a WINDOW x WINDOW
    in-plane neighbourhood is of iodine density and spread no more than the noise (bone's
    marrow is textured, its cortex an edge), eroded by CORE_MM.

    Every step is in-plane, so a few slices are judged at a time and only the cores'
    voxels are kept: no box-sized mask is ever held for them.
    """
    hu = bone.hu
    floats = float_type(hu)
    spread = (HOMOGENEOUS_NOISE * noise) ** 2
    ry, rx = radius_px(bone, CORE_MM)
    plane = hu.shape[1] * hu.shape[2]

    def step(z: int) -> np.ndarray:
        part = hu[z:z + CHUNK].astype(floats)
        mean = ndimage.uniform_filter(part, size=(1, WINDOW, WINDOW))
        np.multiply(part, part, out=part)
        square = ndimage.uniform_filter(part, size=(1, WINDOW, WINDOW))
        del part
        square -= mean * mean  # the neighbourhood's variance
        lumen = square <= spread
        del square
        lumen &= mean > IODINE_HU[0]
        lumen &= mean <= IODINE_HU[1]
        del mean
        erode(lumen, ry, rx, in_place=True)
        return (np.flatnonzero(lumen) + z * plane).astype(index)

    # A lumen's voxels may be millions at 400 slices: their indices are held as int32
    # where the box allows it, half of int64.
    index = np.int32 if hu.size < np.iinfo(np.int32).max else np.int64
    return np.concatenate(each_slab(step, range(0, hu.shape[0], CHUNK)))


def _pieces(shape: tuple[int, ...], flat: np.ndarray) -> LabelStats:
    """The connected pieces of the voxels ``flat`` (on a box of ``shape``), labelled on
    their own bounding box only.

    Not into the skeleton's label buffer: that is mapped at the thick parts'
    labelling, after their box-sized masks are gone; mapped here it would lie
    beside them.
    """
    zyx = np.unravel_index(flat, shape)
    low = [int(i.min()) for i in zyx]
    mask = np.zeros([int(i.max()) - m + 1 for i, m in zip(zyx, low, strict=True)], dtype=bool)
    at = tuple(i - m for i, m in zip(zyx, low, strict=True))
    mask[at] = True
    labels, count = compact_label(mask)
    return LabelStats.from_voxels(flat, labels[at], count)


def great_vessels(bone: BoxedVolume) -> tuple[np.ndarray, float]:
    """The great vessels' core voxels (flat indices on the ``bone`` box) and the densest
    one's mean HU."""
    hu = bone.hu
    noise = image_noise(hu)
    flat = _cores(bone, noise)
    if flat.size == 0:
        return flat, 0.0
    pieces = _pieces(hu.shape, flat)
    count = pieces.count
    mean, sd = pieces.mean_and_sd(hu)
    tube = round_tubes(bone.volume, bone.box, pieces, np.arange(1, count + 1))
    tube &= sd <= HOMOGENEOUS_NOISE * noise
    if not tube.any():
        return flat[:0], 0.0
    return pieces.flat[np.concatenate([[False], tube])[pieces.lab]], float(mean[tube].max())


def round_tubes(volume: Volume, box: Box, core: LabelStats, which: np.ndarray
                ) -> np.ndarray:
    """For labels ``which`` (their ``core`` voxels, flat indices on ``box``): a round
    cross-section of a vessel's size, longer than a vertebra."""
    out = np.zeros(len(which), dtype=bool)
    pixel_mm2 = volume.pixel_spacing[0] * volume.pixel_spacing[1]
    bone = BoxedVolume(volume, box)
    shape = bone.shape
    offsets = bone.slice_offsets
    wanted = np.zeros(core.count + 1, dtype=bool)
    wanted[which] = True
    pick = wanted[core.lab]
    order = np.argsort(core.lab[pick], kind="stable")
    lab = core.lab[pick][order]
    if lab.size == 0:
        return out
    zyx = np.unravel_index(core.flat[pick][order], shape)
    starts = np.flatnonzero(np.concatenate([[True], lab[1:] != lab[:-1]]))
    first = [np.minimum.reduceat(i, starts) for i in zyx]
    last = [np.maximum.reduceat(i, starts) for i in zyx]
    sizes = np.diff(np.concatenate([starts, [lab.size]]))
    at = {int(label): j for j, label in enumerate(lab[starts])}
    for k, label in enumerate(which):
        if int(label) not in at:
            continue
        j = at[int(label)]
        size = int(sizes[j])
        n_slices = int(last[0][j] - first[0][j]) + 1
        length = abs(offsets[last[0][j]] - offsets[first[0][j]])
        area = size / n_slices * pixel_mm2
        fill = size / (n_slices * int(last[1][j] - first[1][j] + 1)
                       * int(last[2][j] - first[2][j] + 1))
        out[k] = length >= VESSEL_MM and area >= VESSEL_CORE_MM2 and fill >= ROUND_FILL
    return out
