"""Lungs (left and right in the patient's sense) and the airway tree between them.

Aerated lung is below LUNG_HU inside the body; pure air (below GAS_HU) that
reaches outside the lungs' outline on some slice is airway or other gas, and
the tree it forms in 3D is left out of the lungs. That same tree gives the
Trachea and the main bronchi. Masks are ``(z, y, x)``; patient coordinates
are DICOM LPS (+x is the patient's left).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from oncoseg_node.contouring.engines.classical.blocks import (
    Block,
    box_by_slab,
    rows_box,
)
from oncoseg_node.contouring.engines.classical.body import patient_x
from oncoseg_node.contouring.engines.classical.boxed import BoxedVolume
from oncoseg_node.contouring.engines.classical.labels import (
    LabelStats,
    compact_label,
    components,
)
from oncoseg_node.contouring.engines.classical.morphology import (
    BLUR_PX,
    dilate,
    fill_holes,
    radius_px,
)
from oncoseg_node.contouring.engines.classical.voxels import labelled_as
from oncoseg_node.contouring.mask_crop import box_of
from oncoseg_node.contouring.volume import Volume

# HU levels are integers: int16 HU compare with them in 16-bit arithmetic.
LUNG_HU = -400         # half way between aerated lung (~-850) and soft tissue (~40)
GAS_HU = -950          # pure air (airways, bowel, oesophagus); parenchyma stays above
WALL_MM = 3.0          # airway wall (and blurred lumen edge) excluded from lung with the air
MIN_LUNG_CC = 30.0     # smaller aerated pockets are not a lung
AIRWAY_EDGE_HU = -480  # half way between air and the airway wall
AIRWAY_WALL_MM = 1.5   # tracheal and bronchial wall, contoured with the airway
MAIN_BRONCHUS_MM = 50.0  # main bronchi below the carina; lobar ones are lung
JUNCTION_MM = 40.0     # the anterior junction line lies this close to the body's midline
SIDE_SHARE = 0.8       # a component this much on one side of the midline is that side's lung
NEAR_LUNG_MM = 3.0     # past its wall, the airway reaches this close to each lung
MIN_BRONCHUS_MM2 = 10.0  # at the carina each main bronchus's lumen is at least this


def _split_merged(there: BoxedVolume, part: np.ndarray, mid: np.ndarray) -> np.ndarray:
    """Left (patient) share of two lungs joined at a junction; ``part`` given on ``there``.

    On axial images each slice is cut at the column within JUNCTION_MM of
    the body's midline where the joined lungs are thinnest (the junction line,
    which is often off the midline); on oblique images voxels go by side.
    """
    x_of = patient_x(there.volume, there.box) - there.on_slices(mid)[:, None, None]
    if x_of.shape[1] != 1:
        return part & (x_of > 0)
    left = np.zeros_like(part)
    for k in np.flatnonzero(part.any(axis=(1, 2))):
        col_x = x_of[k, 0]
        profile = part[k].sum(axis=0).astype(float)
        profile[np.abs(col_x) > JUNCTION_MM] = np.inf
        cut = col_x[int(np.argmin(profile))] if np.isfinite(profile).any() else 0.0
        left[k] = part[k] & (col_x > cut)[None, :]
    return left


def _gas_tree(aerated: np.ndarray, hu: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """Pure air reaching outside the lungs' outline: (labels, count, tree labels).

    Pure air that some slice shows outside the aerated lung's outline (the
    trachea in the mediastinum, gas in oesophagus or bowel) is airway or gas,
    and so is all pure air connected to it in 3D: the main bronchi inside the
    lungs. Pure air enclosed by lung throughout (bullae, noise) stays lung.
    """
    gas = hu < GAS_HU
    gas &= aerated
    if not gas.any():
        return np.zeros(gas.shape, dtype=np.int32), 0, np.zeros(0, dtype=np.int64)
    labels, count = compact_label(gas, np.ones((3, 3, 3)))  # bronchi run obliquely
    # Leave out the air's own blurred rim, or every airway would look enclosed by "lung".
    # (In place, one box of booleans: gas & ~fill_holes(aerated & ~dilate(gas, BLUR_PX)).)
    beyond = dilate(gas, BLUR_PX, BLUR_PX)
    np.logical_not(beyond, out=beyond)
    beyond &= aerated
    fill_holes(beyond, out=beyond)
    np.logical_not(beyond, out=beyond)
    beyond &= gas
    outside = labels[beyond]
    return labels, count, np.unique(outside[outside > 0])


class LungsAndAirways:
    """Both lungs and the airway tree, each held as a block on its own box.

    ``left``, ``right``, ``trachea`` and ``bronchus`` give full ``(z, y, x)``
    masks (empty when not in view); :meth:`block` gives one on its box only.
    ``outline`` is External as its block (booleans or bits): the lungs are looked for in
    its box, so no full-volume temporary is made. ``airways=False`` skips the
    trachea and bronchi (then reported empty) when no structure asks for them.
    """

    NAMES = ("left", "right", "trachea", "bronchus")

    def __init__(self, volume: Volume, outline: Block, mid: np.ndarray,
                 *, airways: bool = True) -> None:
        self._held: dict[str, Block] = {}

        def aerated_in(part: slice) -> np.ndarray:
            found = volume.hu[rows_box(outline.box, part)] < LUNG_HU
            found &= outline.rows(part.start, part.stop)
            return found

        self.box = box_by_slab(outline.box, volume.shape, aerated_in, pad=2)
        box = self.box
        if box is None:
            return
        lungs = BoxedVolume(volume, box)
        hu = lungs.hu
        aerated = hu < LUNG_HU
        aerated &= outline.within(box)
        labels, count, tree_labels = _gas_tree(aerated, hu)
        tree = labelled_as(labels, tree_labels, count) if count else np.zeros_like(aerated)
        # The trachea and bronchi need the tree's own voxels and labels, not a box of labels.
        tree_voxels = None
        if airways and count:
            flat = np.flatnonzero(tree)
            tree_voxels = LabelStats.from_voxels(flat, labels.ravel()[flat], count)
            del flat
        del labels
        airway = dilate(tree, *radius_px(volume, WALL_MM)) if tree.any() else tree
        del tree
        aerated &= ~airway
        left, right = _lungs(lungs, aerated, mid)
        del aerated
        per_slice_cc = volume.voxel_volume_mm3
        found: dict[str, np.ndarray] = {}  # on the lungs' box
        for name, side in (("left", left), ("right", right)):
            # Vessels inside a lung are lung; airways stay out even where a lung encloses them.
            lung = fill_holes(side, out=side)
            lung &= ~airway
            # Counted per slice of the whole series, as Volume.mask_volume_cc does.
            per_slice = np.zeros(volume.shape[0])
            per_slice[box[0]] = lung.reshape(lung.shape[0], -1).sum(axis=1)
            if float((per_slice * per_slice_cc).sum() / 1000.0) >= MIN_LUNG_CC:
                found[name] = lung
        del left, right, airway
        if tree_voxels is not None and "left" in found and "right" in found:
            for name, airway_block in zip(("trachea", "bronchus"), _trachea_and_bronchi(
                    lungs, tree_voxels, tree_labels, found["left"], found["right"]),
                    strict=True):
                if airway_block is not None:
                    self._held[name] = airway_block
        del tree_voxels
        sides = [found[n] for n in ("left", "right") if n in found]
        if sides:
            found["both"] = np.logical_or(*sides) if len(sides) == 2 else sides[0].copy()
        # Each kept on its own box: the lungs' box is several times a lung's.
        for name, array in found.items():
            held = lungs.tight(array)
            if held is not None:
                self._held[name] = held

    def block(self, name: str) -> Block | None:
        """``name`` (one of NAMES, or "both") on its own box; None when not found."""
        return self._held.get(name)

    def both_block(self) -> Block | None:
        """Left and right lung together."""
        return self.block("both")


def _lungs(lungs: BoxedVolume, aerated: np.ndarray, mid: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:
    """Aerated lung (airways removed) on the ``lungs`` box sorted into (left, right)
    components.

    ``aerated`` is given up: once labelled, its memory holds the left lung.
    """
    parts = components(aerated)
    labels, sizes = parts.labels, parts.cc(lungs.volume, lungs.z0)
    x_of = patient_x(lungs.volume, lungs.box) - np.nan_to_num(lungs.on_slices(mid))[:, None, None]
    left, right = aerated, np.zeros_like(aerated)
    left[...] = False
    # Each component judged on its own box, not as a mask the size of the lungs' box.
    objects = ndimage.find_objects(labels)
    for label in np.flatnonzero(sizes >= MIN_LUNG_CC) + 1:
        at = objects[label - 1]
        assert at is not None  # a labelled component has voxels
        part = labels[at] == label
        x_part = x_of[at[0], slice(None) if x_of.shape[1] == 1 else at[1], at[2]]
        share_left = float((part & (x_part > 0)).sum() / part.sum())
        if share_left >= SIDE_SHARE:
            left[at] |= part
        elif 1.0 - share_left >= SIDE_SHARE:
            right[at] |= part
        else:  # both lungs in one component: joined at the anterior junction
            on_left = _split_merged(lungs.sub(box_of(at)), part, np.nan_to_num(mid))
            left[at] |= on_left
            right[at] |= part & ~on_left
    return left, right


def _airway_label(lungs: BoxedVolume, tree: LabelStats, tree_labels: np.ndarray,
                  left: np.ndarray, right: np.ndarray) -> int:
    """The largest piece of the gas tree (its voxels ``tree``, labels ``tree_labels``)
    that comes near both lungs; 0 when none does."""
    reach = radius_px(lungs, WALL_MM + NEAR_LUNG_MM)
    near_both = np.ones(tree.count + 1, dtype=bool)
    for lung in (left, right):
        near = dilate(lung, *reach)
        touches = np.zeros(tree.count + 1, dtype=bool)
        touches[tree.lab[near.ravel()[tree.flat]]] = True
        near_both &= touches
        del near
    best, best_size = 0, 0
    for label in tree_labels.tolist():  # ascending: of equal sizes, the first is kept
        if tree.size[label - 1] > best_size and near_both[label]:
            best, best_size = int(label), int(tree.size[label - 1])
    return best


def _trachea_and_bronchi(lungs: BoxedVolume, tree: LabelStats, tree_labels: np.ndarray,
                         left: np.ndarray, right: np.ndarray
                         ) -> tuple[Block | None, Block | None]:
    """Trachea above the carina and the main bronchi below it, walls included,
    each on its own box (volume indices).

    The airway is the gas tree that reaches both lungs (oesophageal or bowel
    gas does not). Its lumen edge lies half way between air and the wall; the
    wall is AIRWAY_WALL_MM thick. The carina is the most cranial slice where
    the lumen splits in two; bronchi are kept to MAIN_BRONCHUS_MM below it.
    The airway is worked on its own box, grown in-plane by what its lumen
    and wall reach, not on the lungs' box.
    """
    best = _airway_label(lungs, tree, tree_labels, left, right)
    if not best:
        return None, None
    hu = lungs.hu
    at = np.unravel_index(tree.flat[tree.lab == best], hu.shape)
    wall = radius_px(lungs, AIRWAY_WALL_MM)
    near = box_of([slice(int(at[0].min()), int(at[0].max()) + 1)] + [
        slice(max(int(at[a].min()) - 1 - wall[a - 1], 0),
              min(int(at[a].max()) + 2 + wall[a - 1], hu.shape[a])) for a in (1, 2)])
    core = np.zeros(tuple(s.stop - s.start for s in near), dtype=bool)
    core[tuple(i - s.start for i, s in zip(at, near, strict=True))] = True
    del at
    lungs_there = left[near] | right[near]
    # The lumen's edge is blurred over a pixel: taken out to where it is half way to the wall.
    lumen = dilate(core, BLUR_PX, BLUR_PX) & (hu[near] < AIRWAY_EDGE_HU)
    lumen = core | (lumen & ~lungs_there)
    outer = dilate(lumen, *wall) & ~lungs_there
    # Patient z of each slice: the carina is found from the head down.
    airway = lungs.sub(near)
    z_mm = airway.on_slices(lungs.volume.positions)[:, 2]
    order = np.argsort(-z_mm)
    min_px = MIN_BRONCHUS_MM2 / (airway.pixel_spacing[0] * airway.pixel_spacing[1])
    carina = None
    for k in order:
        if not core[k].any():
            continue
        if int((components(core[k]).voxels() >= min_px).sum()) >= 2:
            carina = float(z_mm[k])
            break
    if carina is None:
        return airway.tight(outer), None
    above = (z_mm > carina)[:, None, None]
    bronchial = ((z_mm <= carina) & (z_mm >= carina - MAIN_BRONCHUS_MM))[:, None, None]
    return airway.tight(outer & above), airway.tight(outer & bronchial)
