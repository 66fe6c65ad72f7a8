"""The body outline (External) and where the patient's midline runs.

External is the body without couch, mattress, immobilisation or air. The
couch side comes from PatientPosition (supine: posterior, prone: anterior),
so HFS, HFP, FFS and FFP series all come out right. Masks are ``(z, y, x)``
on the volume's grid; patient coordinates are DICOM LPS (+x: patient's left).
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from oncoseg_node.contouring.engines.classical.blocks import Block, rows_box
from oncoseg_node.contouring.engines.classical.labels import components
from oncoseg_node.contouring.engines.classical.morphology import (
    dilate,
    fill_holes,
    opening,
    radius_px,
)
from oncoseg_node.contouring.engines.classical.slabs import SLAB
from oncoseg_node.contouring.mask_crop import Box, box_of
from oncoseg_node.contouring.volume import Volume

# HU levels are integers: int16 HU compare with them in 16-bit arithmetic.
# The skin/air edge, and the node's one body threshold (the sanity checks' fallback body
# reads it too). Couch foam, headrests and vacuum bags stay below it. Raised to -300,
# External's Dice against the phantoms' truth falls by 0.002 on the thoraxes and the
# pelvis and by 0.16 on the head (whose Bones fall by 0.19).
BODY_HU = -350
OPEN_MM = 3.0          # thinner than 2x this (masks, straps, cables) is not patient
COUCH_STEP_MM = 30.0   # a couch top is this much wider than the body just above it
MIN_BODY_FRACTION = 0.05  # body parts smaller than this share of the largest are devices
SUPINE, PRONE = frozenset({"HFS", "FFS"}), frozenset({"HFP", "FFP"})


# Slices thresholded at a time: the candidate is never a whole volume of booleans.

LABEL_SLAB = 32  # slices labelled at a time when the body's parts are sized


class _Rows:
    """Per (slice, row) of the dense (> BODY_HU) material: any, first and end column.

    Found slab by slab, with the columns hit on each row over all slices, so
    the couch and the candidate's box come without a full candidate mask.
    """

    def __init__(self, volume: Volume) -> None:
        z, y, x = volume.shape
        self.any = np.zeros((z, y), dtype=bool)
        self.first = np.zeros((z, y), dtype=np.intp)
        self.last = np.zeros((z, y), dtype=np.intp)
        self.columns = np.zeros((y, x), dtype=bool)  # per row: columns dense on some slice
        for k in range(0, z, SLAB):
            dense = volume.hu[k:k + SLAB] > BODY_HU
            self.any[k:k + SLAB] = dense.any(axis=2)
            self.first[k:k + SLAB] = np.argmax(dense, axis=2)
            self.last[k:k + SLAB] = x - np.argmax(dense[:, :, ::-1], axis=2)
            self.columns |= dense.any(axis=0)

    def box(self, couch: slice | None, pad: int) -> Box | None:
        """Bounding box of the dense material off the couch, grown ``pad`` in-plane."""
        rows = np.ones(self.any.shape[1], dtype=bool)
        if couch is not None:
            rows[couch] = False
        on_rows = self.any & rows[None, :]
        spans = []
        for axis, hit in enumerate((on_rows.any(axis=1), on_rows.any(axis=0),
                                    self.columns[rows].any(axis=0))):
            where = np.flatnonzero(hit)
            if where.size == 0:
                return None
            p = pad if axis > 0 else 0
            spans.append(slice(max(int(where[0]) - p, 0),
                               min(int(where[-1]) + 1 + p, hit.size)))
        return box_of(spans)


def _couch_rows(volume: Volume, rows: _Rows) -> slice | None:
    """Image rows at and beyond the couch top, or None when no couch is found.

    The couch is on the patient's posterior side when supine and anterior
    when prone: a plate wider than the body on it, the same on every slice.
    Following the lateral extent of dense material row by row (median over
    slices) from the body's middle toward the couch, the extent shrinks with
    the body's curve and jumps at the couch top, whether or not the patient
    touches it. Opening cannot do this: a plate pressed flat against the
    skin survives any opening.
    """
    col_y = float(volume.col_direction[1])
    if volume.patient_position not in SUPINE | PRONE or abs(col_y) < 0.5:
        return None  # decubitus or an oblique image: leave it to the opening
    down = int(np.sign(col_y)) * (1 if volume.patient_position in SUPINE else -1)
    per_row = rows.any.sum(axis=0)
    if not per_row.any():
        return None
    extent = np.median((rows.last - rows.first) * rows.any, axis=0) * volume.pixel_spacing[1]
    middle = int(np.searchsorted(np.cumsum(per_row), per_row.sum() / 2))
    widest = extent[middle]
    stop = len(extent) if down > 0 else -1
    for r in range(middle + 2 * down, stop, down):
        before = min(extent[r - down], extent[r - 2 * down])
        if extent[r] - before >= COUCH_STEP_MM and extent[r] > widest:
            return slice(r, None) if down > 0 else slice(0, r + 1)
        widest = max(widest, extent[r])
    return None


def _dense(volume: Volume, box: Box, couch: slice | None) -> np.ndarray:
    """The candidate on ``box``: dense material, the couch rows cleared."""
    dense = volume.hu[box] > BODY_HU
    if couch is not None:
        ys = np.arange(box[1].start, box[1].stop)
        on_couch = np.zeros(volume.shape[1], dtype=bool)
        on_couch[couch] = True
        dense[:, on_couch[ys], :] = False
    return dense


def _keep_main_parts(core: np.ndarray) -> bool:
    """Keep in ``core`` its 3D parts of at least MIN_BODY_FRACTION of the largest.

    The parts are those of ``ndimage.label`` on the whole box, found a slab at a
    time: each slab is labelled on its own, the pieces that touch across slab
    borders are joined, and only slabs holding a dropped piece are labelled
    again to clear it. The labels never exist for the whole box at once (they
    would be twice its size). False when ``core`` is empty.
    """
    starts = range(0, core.shape[0], LABEL_SLAB)
    sizes, offsets, pairs = [np.zeros(1, dtype=np.int64)], [], []
    total, previous = 1, None  # global piece 0 is the background
    for k in starts:
        parts = components(core[k:k + LABEL_SLAB])
        labels, count = parts.labels, parts.count
        offsets.append(total)
        sizes.append(parts.voxels())
        first = labels[0]
        if previous is not None:
            touching = (previous > 0) & (first > 0)
            pairs.append(np.stack([previous[touching].astype(np.int64) + offsets[-2] - 1,
                                   first[touching].astype(np.int64) + total - 1]))
        previous = labels[-1].copy()
        total += count
    if total == 1:
        return False
    edges = np.concatenate(pairs, axis=1) if pairs else np.zeros((2, 0), dtype=np.int64)
    graph = coo_matrix((np.ones(edges.shape[1], dtype=np.int8), (edges[0], edges[1])),
                       shape=(total, total))
    _, part = connected_components(graph, directed=False)
    piece_sizes = np.concatenate(sizes)
    part_sizes = np.bincount(part[1:], weights=piece_sizes[1:])
    keep = np.concatenate([[False], part_sizes[part[1:]] >= MIN_BODY_FRACTION * part_sizes.max()])
    for slab, k in enumerate(starts):
        stop = offsets[slab + 1] if slab + 1 < len(offsets) else total
        pieces = keep[offsets[slab]:stop]
        if pieces.all():
            continue  # every piece here is kept: the slab stays as it is
        components(core[k:k + LABEL_SLAB]).mask(pieces, out=core[k:k + LABEL_SLAB])
    return True


def external_block(volume: Volume) -> Block | None:
    """Body outline as a block: couch cut, thin devices opened away, main parts kept,
    holes filled. None when the series holds no body.

    At most three box-sized masks live at once (the opened core, its labels at
    two bytes a voxel); the candidate is thresholded again where it is needed
    rather than kept beside them.
    """
    rows = _Rows(volume)
    couch = _couch_rows(volume, rows)
    box = rows.box(couch, pad=2)
    if box is None:
        return None
    ry, rx = radius_px(volume, OPEN_MM)
    cand = _dense(volume, box, couch)
    if ry or rx:
        core = np.empty_like(cand)
        for k in range(0, core.shape[0], SLAB):  # in-plane: slabs are independent
            core[k:k + SLAB] = opening(cand[k:k + SLAB], ry, rx)
    else:
        core = cand
    del cand
    if not _keep_main_parts(core):
        return None
    # Give back the skin detail the opening shaved off, not what lies beyond it.
    grown = dilate(core, ry, rx)
    for k in range(0, grown.shape[0], SLAB):
        grown[k:k + SLAB] &= _dense(volume, rows_box(box, slice(k, k + SLAB)), couch)
        grown[k:k + SLAB] |= core[k:k + SLAB]
    del core
    fill_holes(grown, out=grown)
    return Block(box, grown)


def external(volume: Volume) -> np.ndarray:
    """Body outline ``(z, y, x)``: couch cut, thin devices opened away, main parts kept,
    holes filled."""
    block = external_block(volume)
    return np.zeros(volume.shape, dtype=bool) if block is None else block.full(volume.shape)


def patient_x(volume: Volume, box: Box) -> np.ndarray:
    """Patient x (mm) of the voxel centres in ``box``, broadcastable to its shape."""
    x = (volume.positions[box[0], 0][:, None, None]
         + volume.pixel_spacing[1] * volume.row_direction[0]
         * np.arange(box[2].start, box[2].stop)[None, None, :])
    if volume.col_direction[0] != 0:  # only oblique images: keep axial cases (z, 1, x)
        x = x + (volume.pixel_spacing[0] * volume.col_direction[0]
                 * np.arange(box[1].start, box[1].stop)[None, :, None])
    return x


def midlines(volume: Volume, body: np.ndarray | Block | None) -> np.ndarray:
    """Mean patient x (mm) of the body on each slice; NaN where there is none.

    ``body`` is the full mask or its block, as booleans or bits (the same
    numbers, from the box only, a slab at a time).
    """
    # A full mask is the engine's public form (tests, prompts); the steps pass blocks.
    block = Block.whole(body) if isinstance(body, np.ndarray) else body
    z = volume.shape[0]
    count = np.zeros(z)
    rows = np.zeros(z, dtype=np.int64)
    cols = np.zeros(z, dtype=np.int64)
    if block is not None:
        zs, ys, xs = block.box
        for k in range(0, zs.stop - zs.start, SLAB):
            part = block.rows(k, k + SLAB)
            at = slice(zs.start + k, zs.start + k + part.shape[0])
            count[at] = part.sum(axis=(1, 2))
            rows[at] = part.sum(axis=2) @ np.arange(ys.start, ys.stop)
            cols[at] = part.sum(axis=1) @ np.arange(xs.start, xs.stop)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (volume.positions[:, 0]
                + volume.pixel_spacing[0] * volume.col_direction[0] * rows / count
                + volume.pixel_spacing[1] * volume.row_direction[0] * cols / count)
