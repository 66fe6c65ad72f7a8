"""The parts every phantom site shares: couch and mattress, body, arms, spine, ribs.

Each function draws into a slice's HU image and returns truth masks, in
patient coordinates (LPS) on a :class:`Slice`. Bones are built as real ones
are: a cortical shell around trabecular marrow, so an engine has to fill a
bone's interior rather than find a solid block; vertebrae have pedicles only
over part of their height, so the bony ring around the spinal canal is
closed on a minority of slices.
"""

from __future__ import annotations

import numpy as np

from oncoseg_node.commissioning.phantom_grid import Frame, Slice

AIR, LUNG, FAT, SOFT, BLOOD, CSF, WATER = -1000.0, -860.0, -100.0, 40.0, 45.0, 10.0, 10.0
CORD, EPIDURAL_FAT, DISC, FATTY_MARROW = 35.0, -80.0, 80.0, -40.0
COUCH_SHELL, COUCH_CORE, MATTRESS, HEADREST, MASK, METAL = 250.0, -750.0, -820.0, -600.0, \
    150.0, 3000.0
COUCH_HALF_WIDTH = 265.0  # a radiotherapy couch top is about 53 cm wide
COUCH_CURVE_MM = 25.0     # a curved couch top rises this much at its edges
VERTEBRA_MM, DISC_MM = 26.0, 5.0


def couch_top(g: Slice, f: Frame, flat: float) -> np.ndarray:
    """Depth toward the couch (mm) of the couch top at each column."""
    if f.v.couch == "curved":
        return flat - COUCH_CURVE_MM * np.minimum(np.abs(g.x) / COUCH_HALF_WIDTH, 1.0) ** 2
    return np.full(g.x.shape, flat)


def couch_and_body(g: Slice, f: Frame, a: float, b: float, flat: float, fat_mm: float
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """HU image with couch, mattress and body (fat over soft tissue).

    The patient's back (front, prone) flattens at depth ``flat`` on the
    mattress, which lies on the couch. Returns (hu, body, inner, resting):
    ``resting`` is True where the patient may lie, above the mattress (or the
    couch shell when there is none).
    """
    hu = np.full(g.shape, AIR, dtype=np.float32)
    depth = (f.down * g.y)[:, None]
    top = couch_top(g, f, flat + f.v.mattress_mm)[None, :]
    across = (np.abs(g.x) <= COUCH_HALF_WIDTH)[None, :]
    for lo, hi, value in ((0, 3, COUCH_SHELL), (3, 42, COUCH_CORE), (42, 45, COUCH_SHELL)):
        hu[(depth >= top + lo) & (depth < top + hi) & across] = value
    m = f.v.mattress_mm
    if m > 0:
        hu[(depth >= top - m) & (depth < top) & (np.abs(g.x) <= COUCH_HALF_WIDTH - 15)[None, :]] \
            = MATTRESS
    resting = depth < top - m
    body = g.ellipse(0, 0, a, b) & resting
    inner = g.ellipse(0, 0, a - fat_mm, b - fat_mm) & (depth < top - m - fat_mm)
    hu[body] = FAT
    hu[inner] = SOFT
    return hu, body, inner, resting


def arms(g: Slice, f: Frame, hu: np.ndarray, a: float, resting: np.ndarray,
         near_shoulders: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Arms per the variant, each with a humerus; (arms, humeri, humeral marrow).

    Beside the body they run the scan's length, ``arm_gap_mm`` from the
    trunk; raised above the head, only the upper arms reach the top of a
    scan ``near_shoulders`` (a thorax), next to the shoulders.
    """
    empty = np.zeros(g.shape, dtype=bool)
    v = f.v
    if v.arms == "none" or (v.arms == "up" and not near_shoulders):
        return empty, empty, empty
    s = v.size
    if v.arms == "side":
        rx, ry = 40.0 * s, 45.0 * s
        centres = [(side * (a + v.arm_gap_mm + rx), 5.0) for side in (-1.0, 1.0)]
        zr: tuple[float, float] = (-np.inf, np.inf)
    else:
        rx = ry = 38.0 * s
        centres = [(side * (a + 30.0 * s), -25.0 * s) for side in (-1.0, 1.0)]
        zr = (f.z(0.55), np.inf)
    arm, bone, marrow = empty.copy(), empty.copy(), empty.copy()
    for cx, cy in centres:
        arm |= g.ellipse(cx, cy, rx, ry, zr) & resting
        bone |= g.ellipse(cx, cy, 11.0 * s, 11.0 * s, zr)
        marrow |= g.ellipse(cx, cy, 7.0 * s, 7.0 * s, zr)
    hu[arm] = SOFT
    hu[bone] = min(1.4 * v.cortex_hu, 1800.0)  # a long bone's shaft is dense cortex
    hu[marrow] = FATTY_MARROW  # a shaft's medullary cavity is fatty marrow
    return arm, bone & arm, marrow & arm


def spine(g: Slice, f: Frame, hu: np.ndarray, y0: float, z_lo: float = -np.inf
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vertebrae above ``z_lo`` and the canal; (bones, canal, trabecular marrow).

    Each vertebra: a body (cortical shell and endplates around marrow), a
    disc below it, pedicles over the middle of its height only, laminae and a
    spinous process behind the canal with a gap between one vertebra's
    laminae and the next, transverse processes at the pedicles. So the canal
    is ringed by bone only at the pedicles; elsewhere the ring opens
    laterally (foramina), in front (discs) or behind (interlaminar gaps).
    """
    v = f.v
    c = v.cortex_mm
    phase = np.mod(g.z - f.zc, VERTEBRA_MM)
    z = (z_lo, np.inf)
    disc = g.rows(phase < DISC_MM)
    endplate = g.rows((phase < DISC_MM + c) | (phase > VERTEBRA_MM - c))
    pedicle_band = g.rows((phase > DISC_MM + 5.0) & (phase < DISC_MM + 15.0))
    laminae_band = g.rows((phase > DISC_MM - 1.0) & (phase < VERTEBRA_MM - 4.0))
    yc = y0 + 26.0
    outline = g.ellipse(0, y0, 19, 14, z)
    vbody = outline & ~disc
    marrow = g.ellipse(0, y0, 19 - c, 14 - c, z) & ~endplate
    canal = g.ellipse(0, yc, 8, 7, z)
    ring = g.ellipse(0, yc, 16, 14, z) & ~canal
    front = g.rows(g.y < yc)
    narrow = g.cols(np.abs(g.x) < 8.0)
    # The ring's front is the body's back wall; its sides in front are the pedicles.
    arch = (ring & front & narrow & ~disc) | (ring & front & ~narrow & pedicle_band)
    posterior = ring & ~front & laminae_band
    spinous = g.ellipse(0, y0 + 42, 4, 7, z) & laminae_band
    transverse = g.ellipse(0, yc - 2, 30, 5, z) & g.cols(np.abs(g.x) > 14) & pedicle_band
    hu[outline & disc] = DISC
    hu[vbody] = v.cortex_hu
    hu[marrow] = v.marrow_hu
    processes = arch | posterior | spinous | transverse
    hu[processes] = 0.8 * v.cortex_hu
    hu[canal] = CSF
    hu[g.ellipse(0, yc, 4.5, 4, z)] = CORD
    hu[canal & g.rows(g.y > yc + 4.5)] = EPIDURAL_FAT
    return vbody | processes, canal, marrow


def ribs(g: Slice, f: Frame, hu: np.ndarray, a: float, b: float, thickness: float
         ) -> np.ndarray:
    """Ribs in the chest wall, sloping caudally toward the front; truth at the slice centre.

    A rib is a cortical tube around marrow, about 10 mm tall and 8 mm deep.
    Each slice is ``thickness`` mm thick, so an oblique rib fills it only in
    part: the HU is the average over the slab (sampled at five planes), as
    a scanner reports it. At 3 mm slices the rib's edge is a blend of bone
    and soft tissue, its centre denser than any threshold tuned to thin slices.
    """
    v = f.v
    c = v.cortex_mm

    def rib_at(dz: float) -> tuple[np.ndarray, np.ndarray]:
        sub = Slice(g.x, g.y, g.z + dz)
        ring = sub.ellipse(0, 0, a - 14, b - 14) & ~sub.ellipse(0, 0, a - 22, b - 22)
        phase = np.mod(sub.z - f.zc - 0.25 * sub.y, 25.0)
        where = sub.rows(sub.y > -70 * v.size) & sub.cols(np.abs(sub.x) > 35)
        outer = ring & sub.rows(phase < 10.0) & where
        inner = (sub.ellipse(0, 0, a - 14 - c, b - 14 - c)
                 & ~sub.ellipse(0, 0, a - 22 + c, b - 22 + c)
                 & sub.rows((phase > c) & (phase < 10.0 - c)) & where)
        return outer, inner

    planes = [rib_at(dz) for dz in np.linspace(-0.4, 0.4, 5) * thickness]
    cortex = np.mean([o & ~i for o, i in planes], axis=0)
    marrow = np.mean([i for _, i in planes], axis=0)
    bone = cortex + marrow
    hu[:] = hu * (1.0 - bone) + v.cortex_hu * cortex + v.marrow_hu * marrow
    return rib_at(0.0)[0]
