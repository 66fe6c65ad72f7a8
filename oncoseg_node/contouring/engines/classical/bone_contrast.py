"""Iodinated contrast told from bone (the skeleton's step 3).

Contrast is as dense as bone, but a contrast-filled vessel, bowel loop or
bladder is a plateau no brighter at its rim, while a thick bone is a cortex
brighter than its marrow. Thick parts (what is left after eroding THICK_MM)
whose ring holds no voxels well above the core's median, that ring no
cavity, and that lie apart from the skeleton (no dense bone outside such
plateaus in their connected piece) are contrast. A great vessel on the
spine (a round tube too long for a vertebra) goes as far as it reaches.

Candidates are a few percent of the box: what is judged per voxel is
gathered at their flat indices rather than computed over the whole box.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from oncoseg_node.contouring.engines.classical.bone_candidates import SEED_HU
from oncoseg_node.contouring.engines.classical.labels import (
    IN_PLANE,
    LabelBuffer,
    LabelStats,
    compact_label,
    enclosed,
)
from oncoseg_node.contouring.engines.classical.marrow import FATTY_HU
from oncoseg_node.contouring.engines.classical.morphology import dilate, erode, radius_px
from oncoseg_node.contouring.engines.classical.slabs import SLAB
from oncoseg_node.contouring.engines.classical.voxels import gather, mask_of
from oncoseg_node.contouring.volume import Volume

THICK_MM = 5.0         # thicker than 2x this is a body worth testing for contrast
NEAR_SLICES = 2
REACH_MM = 6.0         # iodine lies within this of its plateau's core
VESSEL_MM = 30.0       # a plateau this long along the table is a vessel, not a vertebra
VESSEL_CORE_MM2 = 30.0  # and this wide once eroded (the aorta, the cava)
ROUND_FILL = 0.35      # share of its bounding box a round cross-section fills
CORTEX_STEP_HU = 60.0  # a cortex's densest voxels stand this far above its marrow
IODINE_HU = 800.0      # a vessel's iodine stays below; a thick cortex lies above
CAVITY_MM2 = 10.0      # a medullary cavity's cross-section is at least this


def without_contrast(volume: Volume, box: tuple[slice, ...], cand: np.ndarray,
                     hu: np.ndarray, scratch: LabelBuffer) -> np.ndarray:
    """``cand`` less the thick plateaus brighter than their rim (iodine), with their rim;
    ``cand`` itself is cut (the caller holds it no more).

    Both labellings are written into ``scratch``. ``cand`` and ``hu`` lie on ``box``.
    """
    found = _thick_parts(volume, cand, scratch)
    if found is None:
        return cand
    stats, in_core = found
    del found
    core_stats, plateau = _plateaus(stats, in_core, hu)
    del in_core
    enclosing = _enclosing(volume, box, cand, hu, stats, plateau)
    contrast = np.concatenate([[False], plateau & ~enclosing[1:]])
    if not contrast.any():
        return cand
    # A vessel is judged on its own core: one component of plateaus may hold the cores
    # of a vessel and of a bone it touches (the aorta against a vertebra's cortex).
    tubes, iodine_hu = _vessel_cores(volume, box, core_stats.flat[contrast[core_stats.lab]],
                                     hu, scratch)
    plateaus = stats.flat[contrast[stats.lab]]
    del stats, core_stats
    _cut_iodine(volume, cand, hu, plateaus, (tubes, iodine_hu), scratch)
    return cand


def _thick_parts(volume: Volume, cand: np.ndarray, scratch: LabelBuffer
                 ) -> tuple[LabelStats, np.ndarray] | None:
    """Each thick part's core with its ring, labelled as one component (into ``scratch``):
    their statistics and, per labelled voxel, whether it is core; None when none is thick."""
    ry, rx = radius_px(volume, THICK_MM)
    core = erode(cand, ry, rx)
    core &= cand
    if not core.any():
        return None
    # Each core with its ring (what lies within a few pixels of it): one component.
    grown = dilate(core, ry + 1, rx + 1)
    grown &= cand
    # Which of its voxels are core, read before labelling: the core's box goes first.
    flat = np.flatnonzero(grown)
    in_core = core.ravel()[flat]
    del core
    labels, count = compact_label(grown, out=scratch.array())
    stats = LabelStats.from_voxels(flat, labels.ravel()[flat], count)
    del grown, labels, flat  # the scratch is relabelled later
    return stats, in_core


def _plateaus(stats: LabelStats, in_core: np.ndarray, hu: np.ndarray
              ) -> tuple[LabelStats, np.ndarray]:
    """The cores' statistics, and per label whether its ring is no brighter than its core."""
    core_stats, ring_stats = stats.subset(in_core), stats.subset(~in_core)
    core_hu = core_stats.mean(hu)
    # The ring's edge is blurred for bone and iodine alike; its densest voxels are not:
    # a cortex stands well above the marrow it holds, a plateau's rim never above it.
    ring_mean, ring_sd = ring_stats.mean_and_sd(hu)
    return core_stats, ring_mean + 1.28 * ring_sd < core_hu + CORTEX_STEP_HU  # ~ 90th percentile


def _enclosing(volume: Volume, box: tuple[slice, ...], cand: np.ndarray, hu: np.ndarray,
               stats: LabelStats, plateau: np.ndarray) -> np.ndarray:
    """Per label (0..count), whether it rings a cavity or is cut by the field of view;
    a ``plateau`` (per label 1..count) is asked whether it rings the cavity itself."""
    # A long bone's shaft is a plateau of cortex too, but it rings its medullary
    # cavity (marrow, never gas: iodine around bowel gas is still iodine).
    enclosing = np.zeros(stats.count + 1, dtype=bool)
    holes = enclosed(cand)
    for z in range(0, hu.shape[0], SLAB):
        holes[z:z + SLAB] &= hu[z:z + SLAB] > FATTY_HU[0]
    dilate(holes, 2, 2, in_place=True)
    enclosing[np.unique(stats.lab[holes.ravel()[stats.flat]])] = True
    del holes
    # A cavity beside a plateau may be another bone's (a vertebra's marrow behind the
    # aorta that touches its cortex): only a cavity the plateau's own voxels ring counts.
    for label in np.flatnonzero(plateau & enclosing[1:]) + 1:
        enclosing[label] = rings_a_cavity(volume, stats.flat[stats.lab == label], hu)
    # What the field of view cuts shows no rim: it cannot be judged, so it is kept.
    edge = _cut_by_the_image(volume, box)
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


def _cut_iodine(volume: Volume, cand: np.ndarray, hu: np.ndarray, plateaus: np.ndarray,
                vessels: tuple[np.ndarray, float], scratch: LabelBuffer) -> None:
    """Cut from ``cand`` the pieces holding ``plateaus`` that lie apart from the skeleton,
    and the reach of the great vessels' core voxels (flat indices on ``cand``) where no
    denser than their iodine (``vessels``: those voxels and the iodine's HU)."""
    reach = radius_px(volume, REACH_MM)
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


def _vessel_cores(volume: Volume, box: tuple[slice, ...], cores: np.ndarray, hu: np.ndarray,
                  scratch: LabelBuffer) -> tuple[np.ndarray, float]:
    """Of the plateaus' core voxels ``cores`` (flat indices on ``box``), those of the
    connected cores that are great vessels, and the densest such vessel's mean HU."""
    if cores.size == 0:
        return cores, 0.0
    labels, count = compact_label(mask_of(hu.shape, cores), out=scratch.array())
    pieces = LabelStats.from_voxels(cores, labels.ravel()[cores], count)
    del labels
    mean = pieces.mean(hu)
    tube = _round_tubes(volume, box, pieces, np.arange(1, count + 1)) & (mean <= IODINE_HU)
    if not tube.any():
        return cores[:0], 0.0
    return pieces.flat[np.concatenate([[False], tube])[pieces.lab]], float(mean[tube].max())


def _round_tubes(volume: Volume, box: tuple[slice, ...], core: LabelStats, which: np.ndarray
                 ) -> np.ndarray:
    """For labels ``which`` (their ``core`` voxels, flat indices on ``box``): a round
    cross-section of a vessel's size, longer than a vertebra."""
    out = np.zeros(len(which), dtype=bool)
    pixel_mm2 = volume.pixel_spacing[0] * volume.pixel_spacing[1]
    shape = tuple(s.stop - s.start for s in box)
    # Slice k of the box is slice box[0].start + k of the volume: its own offsets,
    # which differ from the volume's first ones wherever the spacing is not uniform.
    offsets = volume.slice_offsets[box[0]]
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


def rings_a_cavity(volume: Volume, flat: np.ndarray, hu: np.ndarray) -> bool:
    """Whether the voxels at ``flat`` (on ``hu``'s box) enclose, on some slice, one cavity
    of CAVITY_MM2 or more that is not gas: a long bone's medullary cavity."""
    zyx = np.unravel_index(flat, hu.shape)
    low = [int(i.min()) for i in zyx]
    part = np.zeros([int(i.max()) - m + 1 for i, m in zip(zyx, low, strict=True)], dtype=bool)
    part[tuple(i - m for i, m in zip(zyx, low, strict=True))] = True
    holes = ndimage.binary_fill_holes(part, IN_PLANE)
    holes &= ~part
    holes &= hu[tuple(slice(m, m + n) for m, n in zip(low, part.shape, strict=True))] \
        > FATTY_HU[0]
    labels, count = ndimage.label(holes, IN_PLANE)
    largest = int(np.bincount(labels.ravel())[1:].max()) if count else 0
    return largest * volume.pixel_spacing[0] * volume.pixel_spacing[1] >= CAVITY_MM2


def _cut_by_the_image(volume: Volume, box: tuple[slice, ...]) -> np.ndarray:
    """On ``box``, the pixels on the image's own edge (where the field of view cuts)."""
    shape = tuple(s.stop - s.start for s in box)
    edge = np.zeros(shape, dtype=bool)
    if box[1].start == 0:
        edge[:, 0] = True
    if box[1].stop == volume.shape[1]:
        edge[:, -1] = True
    if box[2].start == 0:
        edge[:, :, 0] = True
    if box[2].stop == volume.shape[2]:
        edge[:, :, -1] = True
    return edge
