"""The spinal canal: the low-density channel behind the vertebral bodies, continuous in 3D.

On real vertebrae bone rings the canal only at the pedicles; between them
the ring opens at the foramina, in front at the discs and behind between the
laminae. So the canal is found where the ring is (nearly) closed, per slice,
after an in-plane closing of CLOSE_MM bridges small gaps; it must be soft
tissue or fluid, of a canal's cross-section, near the midline and right
behind a vertebral body. The slices found are linked into one channel in 3D (the
longest run along the table), and on the slices between them, where the
ring is open, the neighbours' canal is carried over what is not bone. No
spine in the series: no ring near the midline, no canal.

Masks are ``(z, y, x)``; patient coordinates are DICOM LPS (+y posterior).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from oncoseg_node.contouring.engines.classical.blocks import bbox
from oncoseg_node.contouring.engines.classical.boxed import BoxedVolume
from oncoseg_node.contouring.engines.classical.labels import (
    IN_PLANE,
    components,
    enclosed_regions,
)
from oncoseg_node.contouring.engines.classical.morphology import BLUR_PX, dilate, erode, radius_px

CLOSE_MM = 2.0         # gaps in the ring up to twice this are bridged on a slice
WIDE_CLOSE_MM = 4.0    # and, where that finds nothing, up to twice this
CANAL_HU = (-120.0, 90.0)  # CSF, cord and epidural fat; marrow and bone lie above
CANAL_MM2 = (40.0, 700.0)  # cervical to lumbar cross-sections (0.4 to 7 cm^2)
MIDLINE_MM = 25.0      # the canal's centre lies this close to the body's midline
GAP_MM = 30.0          # the ring may be open over this much of the table between finds
END_MM = 15.0          # and beyond the last find, while bone still surrounds the canal
MIN_RUN_MM = 10.0      # a channel shorter than this is not a spine
BODY_IN_FRONT_MM = (6.0, 40.0)  # the vertebral body lies this far in front of the canal
BODY_HALF_WIDTH_MM = 12.0
BODY_MIN_MM2 = 80.0    # and shows at least this much bone there
SOFT_MARGIN_HU = 50.0  # canal tissue carried to or grown into may stray this far past CANAL_HU
DRIFT_MM = 3.0         # the canal moves less than this in-plane from one find to the next
CARRIED_OVERLAP = 0.7  # neighbours' finds sharing this much of the smaller are one canal
END_NEAR_MM = 10.0     # beyond the last find, bone within this of its canal surrounds it
END_BONE_MM2 = 50.0    # while at least this much bone lies there


def _body_in_front(bone: BoxedVolume, shell: np.ndarray, z: int, row: float, col: float
                   ) -> bool:
    """Whether a vertebral body's worth of bone lies in front of (anterior to) a point.

    Anterior is patient -y: up the rows when the column direction points
    posterior (supine), down them when it points anterior (prone).
    """
    forward = -1 if bone.col_direction[1] >= 0 else 1
    near, far = (int(round(mm / bone.pixel_spacing[0])) for mm in BODY_IN_FRONT_MM)
    half = int(round(BODY_HALF_WIDTH_MM / bone.pixel_spacing[1]))
    c0, c1 = max(int(col) - half, 0), max(int(col) + half + 1, 0)

    def bone_mm2(direction: int) -> float:
        r0, r1 = sorted((int(row) + direction * near, int(row) + direction * far))
        patch = shell[z, max(r0, 0):max(r1 + 1, 0), c0:c1]
        return float(patch.sum()) * bone.pixel_spacing[0] * bone.pixel_spacing[1]

    # Behind the canal lies only the arch; a hole with more bone behind it than in
    # front lies in front of a vertebral body (between it and a vessel drawn as bone).
    front = bone_mm2(forward)
    return front >= BODY_MIN_MM2 and front > bone_mm2(-forward)


def _hole_candidates(bone: BoxedVolume, shell: np.ndarray, mid: np.ndarray) -> np.ndarray:
    """Per slice, the enclosed soft-tissue region most like a canal (or nothing).

    The ring is first closed by CLOSE_MM; slices farther than GAP_MM / 2
    from what that finds are tried again with WIDE_CLOSE_MM (a ring open on
    one side, between a pedicle and the body), and what that finds is grown
    back to the bone.
    """
    out = _holes_at(bone, shell, mid, CLOSE_MM)
    # Only where the neighbours' canal will not be carried over: far from any find.
    offsets = bone.slice_offsets
    finds = offsets[out.any(axis=(1, 2))]
    distance = (np.abs(offsets[:, None] - finds[None, :]).min(axis=1) if finds.size
                else np.full(len(offsets), np.inf))
    missing = distance > GAP_MM / 2
    if missing.any():
        wide = _holes_at(bone, shell, mid, WIDE_CLOSE_MM)
        wide &= missing[:, None, None]
        # Soft tissue beside the bone, built in place (each ``&`` would be a box more).
        hu = bone.hu
        soft = hu >= CANAL_HU[0]
        soft &= hu <= CANAL_HU[1] + SOFT_MARGIN_HU
        np.greater(soft, shell, out=soft)  # soft & ~shell
        grown = dilate(wide, *radius_px(bone, WIDE_CLOSE_MM))
        grown &= soft
        del soft
        out |= _inside(wide, grown)
    return out


def _inside(seed: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The in-plane components of ``mask`` that touch ``seed``.

    In-plane components lie on one slice each: each slice that holds a seed
    is labelled on its own (a box of int32 labels was four times the mask).
    """
    out = np.zeros(mask.shape, dtype=bool)
    for z in np.flatnonzero(seed.any(axis=(1, 2))).tolist():
        pieces = components(mask[z:z + 1], IN_PLANE)
        pieces.mask(pieces.touching(seed[z:z + 1] & mask[z:z + 1]), out=out[z:z + 1])
    return out


def _holes_at(bone: BoxedVolume, shell: np.ndarray, mid: np.ndarray, close_mm: float
              ) -> np.ndarray:
    """Per slice, the best canal-like hole in the shell closed by ``close_mm``."""
    ry, rx = radius_px(bone, close_mm)
    closed = erode(dilate(shell, ry, rx), ry, rx, in_place=True)
    closed |= shell
    stats = enclosed_regions(closed)
    del closed
    if not stats.count:
        return np.zeros(shell.shape, dtype=bool)
    holes = stats.where(np.ones(stats.count + 1, dtype=bool), shell.shape)
    area = stats.size * bone.pixel_spacing[0] * bone.pixel_spacing[1]
    # Judge a hole by its inside: next to a dense cortex its rim is blurred toward bone.
    hu = bone.hu
    inner = stats.mean(hu, erode(holes, BLUR_PX, BLUR_PX, in_place=True))
    del holes
    mean = np.where(np.isnan(inner), stats.mean(hu), inner)
    centres = stats.centres(shell.shape)
    best: dict[int, tuple[float, int]] = {}
    ok = (area >= CANAL_MM2[0]) & (area <= CANAL_MM2[1]) \
        & (mean >= CANAL_HU[0]) & (mean <= CANAL_HU[1])
    for label in np.flatnonzero(ok) + 1:
        zf, rf, cf = centres[label - 1]
        z = int(round(zf))
        point = bone.index_to_patient(z, np.array([rf]), np.array([cf]))[0]
        off = abs(point[0] - mid[bone.to_volume(z)])
        if off > MIDLINE_MM or not _body_in_front(bone, shell, z, rf, cf):
            continue  # the canal is near the midline, right behind a vertebral body
        if z not in best or off < best[z][0]:
            best[z] = (off, int(label))
    # Each hole lies on one slice: marking the chosen ones marks one per slice.
    keep = np.zeros(stats.count + 1, dtype=bool)
    keep[[chosen for _, chosen in best.values()]] = True
    return stats.where(keep, shell.shape)


def _longest_channel(bone: BoxedVolume, found: np.ndarray) -> np.ndarray:
    """The found slices that form the longest channel along the table, gaps allowed.

    Finds on neighbouring slices belong together when they overlap once
    dilated a little (the canal moves slowly); runs separated by open-ring
    slices join when a find on either side overlaps within GAP_MM.
    """
    # Finds are one region per slice at most: labelled within their in-plane box
    # (and the dilation's reach), with scipy's numbering all the same.
    reach = radius_px(bone, DRIFT_MM)
    around = bbox(found, pad=max(reach) + 1)
    if around is None:
        return found
    plane = (slice(None), around[1], around[2])
    grown = dilate(found[plane], *reach)
    parts = components(grown)
    labels, count = parts.labels, parts.count
    if not count:
        return found
    offsets = bone.slice_offsets
    slices = ndimage.find_objects(labels)
    spans = [(offsets[s[0].start], offsets[s[0].stop - 1]) for s in slices if s is not None]
    # Join runs whose ends are within GAP_MM and whose outlines overlap in-plane.
    parent = list(range(count + 1))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    footprints = [grown[s].any(axis=0) if s is not None else None for s in slices]
    for i in range(count):
        for j in range(i + 1, count):
            a, b = spans[i], spans[j]
            gap = max(b[0] - a[1], a[0] - b[1])
            si, sj = slices[i], slices[j]
            if gap > GAP_MM or si is None or sj is None:
                continue
            fi = np.zeros(grown.shape[1:], dtype=bool)
            fj = np.zeros(grown.shape[1:], dtype=bool)
            fi[si[1:]] = footprints[i]
            fj[sj[1:]] = footprints[j]
            if (fi & fj).any():
                parent[root(i + 1)] = root(j + 1)
    groups: dict[int, list[int]] = {}
    for label in range(1, count + 1):
        groups.setdefault(root(label), []).append(label)
    length = {g: max(spans[m - 1][1] for m in ms) - min(spans[m - 1][0] for m in ms)
              for g, ms in groups.items()}
    best = max(length, key=lambda g: length[g])
    if length[best] < MIN_RUN_MM:
        return np.zeros_like(found)
    keep = np.zeros(count, dtype=bool)
    keep[np.array(groups[best]) - 1] = True
    out = np.zeros_like(found)
    out[plane] = found[plane] & parts.mask(keep)
    return out


def _carry(bone: BoxedVolume, canal: np.ndarray, shell: np.ndarray) -> np.ndarray:
    """Fill the slices between finds (and a little beyond the ends) from the neighbours."""
    found = np.flatnonzero(canal.any(axis=(1, 2)))
    if found.size == 0:
        return canal
    offsets = bone.slice_offsets
    hu = bone.hu

    def soft(z: int) -> np.ndarray:
        """Slice ``z``'s soft tissue and fluid outside bone (only the slices carried to)."""
        return ((hu[z] >= CANAL_HU[0] - SOFT_MARGIN_HU)
                & (hu[z] <= CANAL_HU[1] + SOFT_MARGIN_HU) & ~shell[z])

    out = canal.copy()
    for prev, nxt in zip(found, found[1:], strict=False):
        if nxt - prev <= 1 or offsets[nxt] - offsets[prev] > GAP_MM:
            continue
        both = canal[prev] & canal[nxt]
        small = min(canal[prev].sum(), canal[nxt].sum())
        for z in range(prev + 1, nxt):
            if both.sum() >= CARRIED_OVERLAP * small:
                carried = both | (canal[prev] if z - prev <= nxt - z else canal[nxt])
            else:
                carried = canal[prev] if offsets[z] - offsets[prev] <= offsets[nxt] - offsets[z] \
                    else canal[nxt]
            out[z] = carried & soft(z)
    near = dilate(canal[[found[0], found[-1]]], *radius_px(bone, END_NEAR_MM))
    pixel_mm2 = bone.pixel_spacing[0] * bone.pixel_spacing[1]
    for end, step, around in ((found[0], -1, near[0]), (found[-1], 1, near[1])):
        reach = [z for z in range(end + step, -1 if step < 0 else canal.shape[0], step)
                 if abs(offsets[z] - offsets[end]) <= END_MM]
        # The series may end inside the spine (the last slices at a disc): carry on
        # to its edge. Otherwise stop where no bone surrounds the canal any more.
        to_edge = bool(reach) and reach[-1] in (0, canal.shape[0] - 1)
        for z in reach:
            if not to_edge and (shell[z] & around).sum() * pixel_mm2 < END_BONE_MM2:
                break
            out[z] = canal[end] & soft(z)
    return out


def spinal_canal(bone: BoxedVolume, shell: np.ndarray, mid: np.ndarray) -> np.ndarray:
    """The canal on the ``bone`` box (where ``shell`` lies); empty when there is no spine.

    ``mid`` is the body's midline (patient x, mm) per slice of the volume.
    """
    found = _hole_candidates(bone, shell, mid)
    if not found.any():
        return found
    return _carry(bone, _longest_channel(bone, found), shell)
