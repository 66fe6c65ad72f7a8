"""Iodinated contrast told from bone (the skeleton's step 3).

Contrast is as dense as bone, but a contrast-filled vessel, bowel loop or
bladder is a plateau no brighter at its rim, while a thick bone is a cortex
brighter than its marrow. Thick parts (what is left after eroding THICK_MM)
whose ring holds no voxels well above the core's median, that ring no
cavity of their own, and that lie apart from the skeleton (no dense bone
outside such plateaus in their connected piece) are contrast. A great vessel
on the spine, found in the image by ``vessels``, goes as far as it reaches
where no denser than its iodine: the cortex it touches stays.

Candidates are a few percent of the box: what is judged per voxel is
gathered at their flat indices rather than computed over the whole box.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from oncoseg_node.contouring.engines.classical.bone_candidates import SEED_HU
from oncoseg_node.contouring.engines.classical.boxed import BoxedVolume
from oncoseg_node.contouring.engines.classical.labels import (
    IN_PLANE,
    LabelBuffer,
    LabelStats,
    compact_label,
    components,
    enclosed,
)
from oncoseg_node.contouring.engines.classical.marrow import FATTY_HU
from oncoseg_node.contouring.engines.classical.morphology import BLUR_PX, dilate, erode, radius_px
from oncoseg_node.contouring.engines.classical.slabs import SLAB
from oncoseg_node.contouring.engines.classical.vessels import great_vessels
from oncoseg_node.contouring.engines.classical.voxels import gather, mask_of

THICK_MM = 5.0         # thicker than 2x this is a body worth testing for contrast
NEAR_SLICES = 2
REACH_MM = 6.0         # iodine lies within this of its plateau's core
CORTEX_STEP_HU = 60.0  # a cortex's densest voxels stand this far above its marrow
CAVITY_MM2 = 10.0      # a medullary cavity's cross-section is at least this
CAVITY_RIM_MM = 2.0    # a shaft's cortex lies within this of the cavity it rings
RIM_PERCENTILE_SD = 1.28  # a normal's 90th percentile, in standard deviations above its mean


def without_contrast(bone: BoxedVolume, cand: np.ndarray, scratch: LabelBuffer
                     ) -> np.ndarray:
    """``cand`` less iodine: the great vessels (found in the image, see ``vessels``) as far
    as they reach, and the thick plateaus no brighter at their rim that lie apart from the
    skeleton; ``cand`` itself is cut (the caller holds it no more).

    Each labelling is written into ``scratch``. ``cand`` lies on the ``bone`` box.
    """
    vessels = great_vessels(bone)
    plateaus = _contrast_plateaus(bone, cand, scratch)
    if plateaus.size or vessels[0].size:
        _cut_iodine(bone, cand, plateaus, vessels, scratch)
    return cand


def _contrast_plateaus(bone: BoxedVolume, cand: np.ndarray, scratch: LabelBuffer
                       ) -> np.ndarray:
    """The voxels (flat indices on the ``bone`` box) of the thick parts that are plateaus ringing
    no cavity of their own: iodine, unless attached to the skeleton."""
    found = _thick_parts(bone, cand, scratch)
    if found is None:
        return np.zeros(0, dtype=np.int64)
    stats, in_core = found
    del found
    plateau = _plateaus(stats, in_core, bone.hu)
    del in_core
    enclosing = _enclosing(bone, cand, stats, plateau)
    return stats.flat[np.concatenate([[False], plateau & ~enclosing[1:]])[stats.lab]]


def _thick_parts(bone: BoxedVolume, cand: np.ndarray, scratch: LabelBuffer
                 ) -> tuple[LabelStats, np.ndarray] | None:
    """Each thick part's core with its ring, labelled as one component (into ``scratch``):
    their statistics and, per labelled voxel, whether it is core; None when none is thick."""
    ry, rx = radius_px(bone, THICK_MM)
    core = erode(cand, ry, rx)
    core &= cand
    if not core.any():
        return None
    # Each core with its ring (what lies within a few pixels of it): one component.
    grown = dilate(core, ry + BLUR_PX, rx + BLUR_PX)  # and the blur beyond
    grown &= cand
    # Which of its voxels are core, read before labelling: the core's box goes first.
    flat = np.flatnonzero(grown)
    in_core = core.ravel()[flat]
    del core
    labels, count = compact_label(grown, out=scratch.array())
    stats = LabelStats.from_voxels(flat, labels.ravel()[flat], count)
    del grown, labels, flat  # the scratch is relabelled later
    return stats, in_core


def _plateaus(stats: LabelStats, in_core: np.ndarray, hu: np.ndarray) -> np.ndarray:
    """Per label, whether its ring is no brighter than its core."""
    core_stats, ring_stats = stats.subset(in_core), stats.subset(~in_core)
    core_hu = core_stats.mean(hu)
    # The ring's edge is blurred for bone and iodine alike; its densest voxels are not:
    # a cortex stands well above the marrow it holds, a plateau's rim never above it.
    ring_mean, ring_sd = ring_stats.mean_and_sd(hu)
    return ring_mean + RIM_PERCENTILE_SD * ring_sd < core_hu + CORTEX_STEP_HU


def _enclosing(bone: BoxedVolume, cand: np.ndarray, stats: LabelStats, plateau: np.ndarray
               ) -> np.ndarray:
    """Per label (0..count), whether it rings a cavity or is cut by the field of view;
    a ``plateau`` (per label 1..count) is asked whether it rings the cavity itself."""
    # A long bone's shaft is a plateau of cortex too, but it rings its medullary
    # cavity (marrow, never gas: iodine around bowel gas is still iodine).
    enclosing = np.zeros(stats.count + 1, dtype=bool)
    hu = bone.hu
    holes = enclosed(cand)
    for z in range(0, hu.shape[0], SLAB):
        holes[z:z + SLAB] &= hu[z:z + SLAB] > FATTY_HU[0]
    dilate(holes, *radius_px(bone, CAVITY_RIM_MM), in_place=True)
    enclosing[np.unique(stats.lab[holes.ravel()[stats.flat]])] = True
    del holes
    # A cavity beside a plateau may be another bone's (a vertebra's marrow behind the
    # aorta that touches its cortex): only a cavity the plateau's own voxels ring counts.
    for label in np.flatnonzero(plateau & enclosing[1:]) + 1:
        enclosing[label] = rings_a_cavity(bone, stats.flat[stats.lab == label])
    # What the field of view cuts shows no rim: it cannot be judged, so it is kept.
    edge = bone.image_edge()
    enclosing[np.unique(stats.lab[edge.ravel()[stats.flat]])] = True
    return enclosing


def _near(shape: tuple[int, ...], plateaus: np.ndarray, reach: tuple[int, int]) -> np.ndarray:
    """Within ``reach`` in-plane and NEAR_SLICES along z of the voxels ``plateaus`` (flat)."""
    near = dilate(mask_of(shape, plateaus), *reach, in_place=True)
    for _ in range(NEAR_SLICES):  # an oblique loop's core may skip a slice or two
        # Slice by slice, each from a neighbour not yet grown: ``near[1:] |= near[:-1]``
        # would buffer a copy of the whole box for its overlap.
        for z in range(near.shape[0] - 1, 0, -1):
            near[z] |= near[z - 1]
        for z in range(near.shape[0] - 1):
            near[z] |= near[z + 1]
    return near


def _cut_iodine(bone: BoxedVolume, cand: np.ndarray, plateaus: np.ndarray,
                vessels: tuple[np.ndarray, float], scratch: LabelBuffer) -> None:
    """Cut from ``cand`` the pieces holding ``plateaus`` that lie apart from the skeleton,
    and the reach of the great vessels' core voxels (flat indices on ``cand``) where no
    denser than their iodine (``vessels``: those voxels and the iodine's HU)."""
    reach = radius_px(bone, REACH_MM)
    hu = bone.hu
    everywhere = np.flatnonzero(cand)
    away = gather(hu, everywhere) > SEED_HU
    near = _near(cand.shape, plateaus, reach)
    # Attached to the skeleton (its piece holds dense bone away from every plateau:
    # a spinous process on its vertebra) it is bone; iodine lies apart, in soft
    # tissue, and goes whole, except a great vessel on the spine: a round tube too
    # long for a vertebra, which goes as far as it reaches.
    away &= ~near.ravel()[everywhere]
    del near
    pieces, n = compact_label(cand, np.ones((3, 3, 3), bool), out=scratch.array())
    piece_of = pieces.ravel()[everywhere]
    holds = np.zeros(n + 1, dtype=bool)
    holds[np.unique(pieces.ravel()[plateaus])] = True
    holds[0] = False
    del pieces
    attached = np.zeros(n + 1, dtype=bool)
    attached[np.unique(piece_of[away])] = True
    # The caller's candidates are its to give up: they are cut where they lie.
    cand.ravel()[everywhere[(holds & ~attached)[piece_of]]] = False
    tubes, iodine_hu = vessels
    if tubes.size:
        # Within reach of a vessel's core, the cortex it touches is denser than its iodine.
        within = np.flatnonzero(dilate(mask_of(cand.shape, tubes), *reach, in_place=True))
        cand.ravel()[within[gather(hu, within) <= iodine_hu + CORTEX_STEP_HU]] = False


def rings_a_cavity(bone: BoxedVolume, flat: np.ndarray) -> bool:
    """Whether the voxels at ``flat`` (on the ``bone`` box) enclose, on some slice, one cavity
    of CAVITY_MM2 or more that is not gas: a long bone's medullary cavity."""
    hu = bone.hu
    zyx = np.unravel_index(flat, hu.shape)
    low = [int(i.min()) for i in zyx]
    part = np.zeros([int(i.max()) - m + 1 for i, m in zip(zyx, low, strict=True)], dtype=bool)
    part[tuple(i - m for i, m in zip(zyx, low, strict=True))] = True
    holes = ndimage.binary_fill_holes(part, IN_PLANE)
    holes &= ~part
    holes &= hu[tuple(slice(m, m + n) for m, n in zip(low, part.shape, strict=True))] \
        > FATTY_HU[0]
    cavities = components(holes, IN_PLANE)
    largest = int(cavities.voxels().max()) if cavities.count else 0
    return largest * bone.pixel_spacing[0] * bone.pixel_spacing[1] >= CAVITY_MM2

