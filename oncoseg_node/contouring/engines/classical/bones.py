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

Steps 1 and 2 live in :mod:`.bone_candidates`, step 3 in :mod:`.bone_contrast`,
the marrow's judgement in :mod:`.marrow`; this module seeds and fills.
Masks are ``(z, y, x)`` on the volume's grid.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from oncoseg_node.contouring.engines.classical.blocks import Block, box_by_slab, rows_box
from oncoseg_node.contouring.engines.classical.bone_candidates import (
    LOW_HU,
    SEED_HU,
    float_type,
    half_maximum,
)
from oncoseg_node.contouring.engines.classical.bone_contrast import without_contrast
from oncoseg_node.contouring.engines.classical.boxed import BoxedVolume
from oncoseg_node.contouring.engines.classical.labels import (
    LabelBuffer,
    LabelStats,
    compact_label,
)
from oncoseg_node.contouring.engines.classical.marrow import (
    MARROW_HU,
    Cavities,
    cavities,
    fatty,
    orthogonal_fill,
    trabecular,
)
from oncoseg_node.contouring.engines.classical.morphology import BLUR_PX, dilate, radius_px
from oncoseg_node.contouring.engines.classical.slabs import SLAB, each_slab
from oncoseg_node.contouring.engines.classical.voxels import PackedMask, gather, mask_of
from oncoseg_node.contouring.volume import Volume

ENCLOSE_HU = 150.0     # smoothed, a thin cortex is still denser than this
ENCLOSE_MM = 2.0       # a thin cortex blended over a thick slice lies this far beside the shell
MARROW_RIM_MM = 1.5    # the cortex blended with marrow: 2 px at 0.68-1.0 mm pixels, 1 at 1.25
SMOOTH_PX = 3          # pixels across the in-plane average: the blur of a pixel either side


def _seeded(cand: np.ndarray, hu: np.ndarray, scratch: LabelBuffer) -> np.ndarray:
    """Parts of ``cand`` connected to a voxel denser than SEED_HU.

    Connected in 3D through ``cand`` grown by a pixel where denser than
    LOW_HU: a thin rib blended over a thick slice falls apart at its own
    half maximum, but its pieces still touch through that margin. The
    labels are written into ``scratch``.
    """
    linked = dilate(cand, BLUR_PX, BLUR_PX)
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
    return mask_of(cand.shape, everywhere[seeded[lab]])


def _smoothed_above(hu: np.ndarray, *levels: float) -> list[np.ndarray]:
    """Where ``hu`` averaged over SMOOTH_PX x SMOOTH_PX in-plane exceeds each level;
    a slab at a time."""
    floats = float_type(hu)
    out = [np.empty(hu.shape, dtype=bool) for _ in levels]

    def step(z: int) -> None:
        # int16 would truncate the average: the filter runs on floats
        smooth = ndimage.uniform_filter(hu[z:z + SLAB].astype(floats, copy=False),
                                        size=(1, SMOOTH_PX, SMOOTH_PX))
        for mask, level in zip(out, levels, strict=True):
            np.greater(smooth, level, out=mask[z:z + SLAB])

    each_slab(step, range(0, hu.shape[0], SLAB))
    return out


class Skeleton:
    """Bones (marrow included) and the solid bone the canal search looks in.

    ``bone`` is the volume on the bone's box (padded in-plane), None when
    nothing in ``outline`` (External's block) is as dense as bone. ``solid`` (cortex and trabecular
    marrow, on that box) is what rings the canal; ``fill`` adds fatty marrow
    and leaves the canal out.
    """

    def __init__(self, volume: Volume, outline: Block) -> None:

        def dense_in(part: slice) -> np.ndarray:
            found = volume.hu[rows_box(outline.box, part)] > LOW_HU
            found &= outline.rows(part.start, part.stop)
            return found

        box = box_by_slab(outline.box, volume.shape, dense_in, pad=2)
        self.bone = None if box is None else BoxedVolume(volume, box)
        self.solid = np.zeros((0, 0, 0), dtype=bool)
        nothing = np.zeros(0, dtype=np.int64)
        self.cavities = Cavities(LabelStats.from_voxels(nothing, nothing, 0), np.zeros(0),
                                 np.zeros(0))
        if self.bone is None:
            return
        bone = self.bone
        # The box's HU, read through views (never copied); the candidates' own voxels
        # are read through ``gather``.
        hu = bone.hu
        cand = half_maximum(bone, outline)
        # One box of labels, written by each 3D labelling in turn.
        scratch = LabelBuffer(hu.shape)
        cand = without_contrast(bone, cand, scratch)
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
        ring = dilate(shell, *radius_px(bone, ENCLOSE_MM))
        ring &= enclose
        del enclose
        ring |= shell
        self.cavities = cavities(bone, shell)
        shell_bits = PackedMask(shell)
        del shell
        marrow = trabecular(self.cavities, dense)
        marrow |= trabecular(cavities(bone, ring), dense)
        marrow |= orthogonal_fill(ring, marrow, dense)
        del dense
        solid = dilate(marrow, *radius_px(bone, MARROW_RIM_MM))
        solid &= ring
        del ring
        solid |= marrow
        del marrow
        solid |= shell_bits.unpack()
        self.solid = solid

    def fill(self, canal_in_box: np.ndarray) -> np.ndarray:
        """The bones with their marrow, the canal left out; on ``box``.

        The last step: the solid bone is let go here.
        """
        bone = fatty(self.cavities, canal_in_box)
        bone |= self.solid
        self.solid = np.zeros((0, 0, 0), dtype=bool)
        np.greater(bone, canal_in_box, out=bone)  # bone & ~canal, without a box for ~canal
        return bone
