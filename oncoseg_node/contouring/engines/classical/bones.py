"""The skeleton: cortical shells found by density, marrow filled in, contrast and metal left out.

Steps, each from what CT shows of bone rather than from one scanner:

1. Candidate bone is denser than LOW_HU and than half way between soft
   tissue and the densest voxel within PEAK_MM (the half-maximum edge: a
   dense cortex's blur does not widen it, a thin rib blended with soft
   tissue over a 3 mm slice is still found at its own, lower, peak).
2. Metal (denser than any bone) and its blur are removed.
3. Iodinated contrast is as dense as bone, but a contrast-filled vessel,
   bowel loop or bladder is a plateau no brighter at its rim, while a thick
   bone is a cortex brighter than its marrow. Thick parts (what is left
   after eroding THICK_MM) whose ring holds no voxels well above the core's
   median, that ring no cavity, and that lie apart from the skeleton (no
   dense bone outside such plateaus in their connected piece) are contrast.
4. Hysteresis: a candidate component is bone only if it holds a voxel
   denser than SEED_HU (enhanced kidney or myocardium never is).
5. Marrow: what the shells enclose is filled, on axial slices and on
   coronal and sagittal ones (a vertebral body whose axial ring is open is
   closed by its endplates on both), when it is trabecular (denser than MARROW_HU)
   or fatty marrow in a small cavity, never the canal or a body cavity.

Masks are ``(z, y, x)`` on the volume's grid.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from oncoseg_node.contouring.engines.classical.blocks import (
    Block,
    PackedBlock,
    box_by_slab,
    rows_box,
)
from oncoseg_node.contouring.engines.classical.labels import (
    LabelBuffer,
    LabelStats,
    compact_label,
    enclosed,
)
from oncoseg_node.contouring.engines.classical.marrow import (
    FATTY_HU,
    MARROW_HU,
    Cavities,
    cavities,
    fatty,
    orthogonal_fill,
    trabecular,
)
from oncoseg_node.contouring.engines.classical.morphology import (
    dilate,
    erode,
    radius_px,
    shift_in_place,
)
from oncoseg_node.contouring.engines.classical.slabs import SLAB, each_slab
from oncoseg_node.contouring.engines.classical.voxels import PackedMask, gather
from oncoseg_node.contouring.volume import Volume

LOW_HU = 120.0         # above unenhanced soft tissue with noise; below any cortex blend
SEED_HU = 250.0        # confident bone: a cortex, even blended over a 3 mm slice
SOFT_HU = 40.0         # what bone borders; its edge lies half way to the bone's peak
PEAK_MM = 2.0
Z_PEAK_WEIGHT = 0.75   # how much of the neighbouring slices' peak counts
METAL_HU = 2500.0      # denser than cortical bone (<= ~2000 HU)
METAL_MARGIN_MM = 2.0  # the blur (and blooming) around metal
THICK_MM = 5.0         # thicker than 2x this is a body worth testing for contrast
NEAR_SLICES = 2
REACH_MM = 6.0         # iodine lies within this of its plateau's core
VESSEL_MM = 30.0       # a plateau this long along the table is a vessel, not a vertebra
VESSEL_CORE_MM2 = 30.0  # and this wide once eroded (the aorta, the cava)
ROUND_FILL = 0.35      # share of its bounding box a round cross-section fills
CORTEX_STEP_HU = 60.0  # a cortex's densest voxels stand this far above its marrow
ENCLOSE_HU = 150.0     # smoothed, a thin cortex is still denser than this


def _local_max(hu: np.ndarray, ry: int, rx: int) -> np.ndarray:
    """In-plane maximum over a (2 ry + 1) x (2 rx + 1) window, cut at the image's edge."""
    out = hu.copy()
    shift_in_place(out, max(ry, 1), 1, np.maximum)
    shift_in_place(out, max(rx, 1), 2, np.maximum)
    return out


def _floats(hu: np.ndarray) -> np.dtype:
    """The float type arithmetic on ``hu`` needs: float32 for int16 HU, else its own."""
    return np.result_type(hu.dtype, np.float32)


def _half_maximum(volume: Volume, hu: np.ndarray, body: Block | PackedBlock,
                  box: tuple[slice, ...]) -> np.ndarray:
    """Steps 1 and 2 on ``hu`` (the bone ``box``): candidate bone, a slab of slices at a time.

    Each slab's peaks need the slice on either side (they count along z), so
    a slab is computed with one slice of margin; the peaks never exist for the
    whole box at once, nor does the body on it.
    """
    ry, rx = radius_px(volume, PEAK_MM)
    margin = radius_px(volume, METAL_MARGIN_MM)
    floats = _floats(hu)
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
        cand[z0:z1] &= body.within((slice(box[0].start + z0, box[0].start + z1), *box[1:]))
        metal = part > METAL_HU
        if metal.any():  # its blur is in-plane: a slab's own metal is all it reaches
            cand[z0:z1] &= ~dilate(metal, *margin)

    each_slab(step, range(0, n, SLAB))
    return cand


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


def _mask_of(shape: tuple[int, ...], flat: np.ndarray) -> np.ndarray:
    """A boolean array of ``shape`` set at the flat indices ``flat``."""
    out = np.zeros(shape, dtype=bool)
    out.ravel()[flat] = True
    return out


def _without_contrast(volume: Volume, box: tuple[slice, ...], cand: np.ndarray,
                      hu: np.ndarray, scratch: LabelBuffer) -> np.ndarray:
    """``cand`` less the thick plateaus brighter than their rim (iodine), with their rim;
    ``cand`` itself is cut (the caller holds it no more).

    Candidates are a few percent of the box: what is judged per voxel is
    gathered at their flat indices rather than computed over the whole box.
    Both labellings are written into ``scratch``. ``cand`` and ``hu`` lie on ``box``.
    """
    ry, rx = radius_px(volume, THICK_MM)
    core = erode(cand, ry, rx)
    core &= cand
    if not core.any():
        return cand
    # Each core with its ring (what lies within a few pixels of it): one component.
    grown = dilate(core, ry + 1, rx + 1)
    grown &= cand
    # Which of its voxels are core, read before labelling: the core's box goes first.
    flat = np.flatnonzero(grown)
    in_core = core.ravel()[flat]
    del core
    labels, count = compact_label(grown, out=scratch.array())
    stats = LabelStats.from_voxels(flat, labels.ravel()[flat], count)
    del grown, labels, flat  # the scratch is relabelled below
    core_stats, ring_stats = stats.subset(in_core), stats.subset(~in_core)
    core_hu = core_stats.mean(hu)
    # The ring's edge is blurred for bone and iodine alike; its densest voxels are not:
    # a cortex stands well above the marrow it holds, a plateau's rim never above it.
    ring_mean, ring_sd = ring_stats.mean_and_sd(hu)
    plateau = ring_mean + 1.28 * ring_sd < core_hu + CORTEX_STEP_HU  # ~ 90th percentile
    # A long bone's shaft is a plateau of cortex too, but it rings its medullary
    # cavity (marrow, never gas: iodine around bowel gas is still iodine).
    enclosing = np.zeros(count + 1, dtype=bool)
    holes = enclosed(cand)
    for z in range(0, hu.shape[0], SLAB):
        holes[z:z + SLAB] &= hu[z:z + SLAB] > FATTY_HU[0]
    dilate(holes, 2, 2, in_place=True)
    enclosing[np.unique(stats.lab[holes.ravel()[stats.flat]])] = True
    del holes
    # What the field of view cuts shows no rim: it cannot be judged, so it is kept.
    edge = _cut_by_the_image(volume, box)
    enclosing[np.unique(stats.lab[edge.ravel()[stats.flat]])] = True
    del edge
    contrast = np.concatenate([[False], plateau & ~enclosing[1:]])
    if not contrast.any():
        return cand
    flagged = np.flatnonzero(contrast)
    vessel = np.zeros(count + 1, dtype=bool)
    vessel[flagged] = _round_tubes(volume, box, core_stats, flagged)
    reach = radius_px(volume, REACH_MM)
    plateaus = stats.flat[contrast[stats.lab]]
    tubes = stats.flat[vessel[stats.lab]]
    del stats, core_stats, ring_stats
    everywhere = np.flatnonzero(cand)
    away = gather(hu, everywhere) > SEED_HU
    near = dilate(_mask_of(cand.shape, plateaus), *reach, in_place=True)
    for _ in range(NEAR_SLICES):  # an oblique loop's core may skip a slice or two
        # Slice by slice, each from a neighbour not yet grown: ``near[1:] |= near[:-1]``
        # would buffer a copy of the whole box for its overlap.
        for z in range(near.shape[0] - 1, 0, -1):
            near[z] |= near[z - 1]
        for z in range(near.shape[0] - 1):
            near[z] |= near[z + 1]
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
    if tubes.size:
        cut = dilate(_mask_of(cand.shape, tubes), *reach, in_place=True)
        np.logical_not(cut, out=cut)
        cand &= cut
    return cand


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


def _seeded(cand: np.ndarray, hu: np.ndarray, scratch: LabelBuffer) -> np.ndarray:
    """Parts of ``cand`` connected to a voxel denser than SEED_HU.

    Connected in 3D through ``cand`` grown by a pixel where denser than
    LOW_HU: a thin rib blended over a thick slice falls apart at its own
    half maximum, but its pieces still touch through that margin. The
    labels are written into ``scratch``.
    """
    linked = dilate(cand, 1, 1)
    for z in range(0, hu.shape[0], SLAB):  # a slab's comparison at a time, not a box of it
        linked[z:z + SLAB] &= hu[z:z + SLAB] > LOW_HU
    linked |= cand
    labels, count = compact_label(linked, np.ones((3, 3, 3), bool), out=scratch.array())
    del linked
    if not count:
        return cand
    everywhere = np.flatnonzero(cand)
    lab = labels.ravel()[everywhere]
    del labels
    seeded = np.zeros(count + 1, dtype=bool)
    seeded[np.unique(lab[gather(hu, everywhere) > SEED_HU])] = True
    seeded[0] = False
    return _mask_of(cand.shape, everywhere[seeded[lab]])


def _smoothed_above(hu: np.ndarray, *levels: float) -> list[np.ndarray]:
    """Where ``hu`` averaged over 3 x 3 in-plane exceeds each level; a slab at a time."""
    floats = _floats(hu)
    out = [np.empty(hu.shape, dtype=bool) for _ in levels]

    def step(z: int) -> None:
        # int16 would truncate the average: the filter runs on floats
        smooth = ndimage.uniform_filter(hu[z:z + SLAB].astype(floats, copy=False), size=(1, 3, 3))
        for mask, level in zip(out, levels, strict=True):
            np.greater(smooth, level, out=mask[z:z + SLAB])

    each_slab(step, range(0, hu.shape[0], SLAB))
    return out


class Skeleton:
    """Bones (marrow included) and the solid bone the canal search looks in.

    ``solid`` (cortex and trabecular marrow, on ``box``) is what rings the
    canal; ``fill`` adds fatty marrow and leaves the canal out. ``box`` is None
    when nothing in the body is as dense as bone.
    """

    def __init__(self, volume: Volume, body: np.ndarray | Block | PackedBlock) -> None:
        outline = Block.whole(body) if isinstance(body, np.ndarray) else body

        def dense_in(part: slice) -> np.ndarray:
            found = volume.hu[rows_box(outline.box, part)] > LOW_HU
            found &= outline.rows(part.start, part.stop)
            return found

        self.box = box_by_slab(outline.box, volume.shape, dense_in, pad=2)
        self.solid = np.zeros((0, 0, 0), dtype=bool)
        self.hu = np.zeros((0, 0, 0), dtype=np.int16)
        nothing = np.zeros(0, dtype=np.int64)
        self.cavities = Cavities(LabelStats.from_voxels(nothing, nothing, 0), np.zeros(0),
                                 np.zeros(0))
        if self.box is None:
            return
        box = self.box
        # HU as they are (int16 from the series), a view of the volume's, never a copy:
        # each step casts a slab to floats where it needs arithmetic, and reads
        # the candidates' own voxels through ``gather``.
        hu = volume.hu[box]
        cand = _half_maximum(volume, hu, outline, box)
        # One box of labels, written by each 3D labelling in turn.
        scratch = LabelBuffer(hu.shape)
        cand = _without_contrast(volume, box, cand, hu, scratch)
        shell = _seeded(cand, hu, scratch)
        del scratch, cand
        # What encloses marrow: the shell, and beside it whatever is denser than
        # ENCLOSE_HU once smoothed (a thin cortex blended with marrow and with the
        # endplate beside it over a thick slice is below the shell's half maximum).
        # Voxel by voxel, marrow is denser than MARROW_HU once smoothed; the canal is not.
        dense_mask, enclose = _smoothed_above(hu, MARROW_HU, ENCLOSE_HU)
        # Masks waiting for a later use are held as bits; each box-sized mask is
        # built in place (``a | b`` would be one more box each).
        dense = PackedMask(dense_mask)
        del dense_mask
        ring = dilate(shell, 2, 2)
        ring &= enclose
        del enclose
        ring |= shell
        self.cavities = cavities(volume, shell, hu)
        shell_bits = PackedMask(shell)
        del shell
        marrow = trabecular(self.cavities, dense)
        marrow |= trabecular(cavities(volume, ring, hu), dense)
        marrow |= orthogonal_fill(ring, marrow, dense)
        del dense
        solid = dilate(marrow, 2, 2)
        solid &= ring
        del ring
        solid |= marrow
        del marrow
        solid |= shell_bits.unpack()
        self.solid = solid
        self.hu = hu

    def fill(self, canal_in_box: np.ndarray) -> np.ndarray:
        """The bones with their marrow, the canal left out; on ``box``.

        The last step: the box's HU and solid bone are let go here.
        """
        bone = fatty(self.cavities, canal_in_box)
        bone |= self.solid
        self.solid = np.zeros((0, 0, 0), dtype=bool)
        self.hu = np.zeros((0, 0, 0), dtype=np.int16)
        np.greater(bone, canal_in_box, out=bone)  # bone & ~canal, without a box for ~canal
        return bone
