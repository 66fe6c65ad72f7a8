"""The abdomen site: a contrast-enhanced upper abdomen, as a portal-venous CT shows it.

What makes a real contrast abdomen hard for bone finding is built in, each
where a patient has it (LPS: +x left, +y posterior):

- the aorta, bright with iodine (the variant's ``contrast_hu``), lies against
  the front of the vertebral bodies, left of the midline, touching them, with
  calcified plaques as dense as cortex in stretches of its wall;
- smaller enhanced vessels run beside the spine (the azygos and hemiazygos
  veins along the bodies' sides, lumbar arteries curving round them), and
  the cava and kidneys enhance less;
- the lower costal cartilages run from the ribs' front ends to the midline
  in the anterior wall, cartilage (~110 HU) with calcified rims and nodules
  as dense as a thin cortex; no atlas counts them as bone;
- the arms lie beside the body with humeri whose cortex is thin and whose
  medullary cavity holds mixed (red and yellow) marrow, near water density.
"""

from __future__ import annotations

import numpy as np

from oncoseg_node.commissioning.phantom_body import (
    SOFT,
    couch_and_body,
    ribs,
    spine,
)
from oncoseg_node.commissioning.phantom_grid import Frame, Slice

CARTILAGE, LIVER, KIDNEY, SPLEEN, MIXED_MARROW, PLAQUE = 110.0, 60.0, 160.0, 50.0, 10.0, 900.0
Site = tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]


def _contrast(f: Frame, share: float = 1.0) -> float:
    """Iodine in a vessel at ``share`` of the aorta's enhancement above blood."""
    return 45.0 + share * (max(f.v.contrast_hu, 250.0) - 45.0)


def _vessels_by_the_spine(g: Slice, f: Frame, y0: float) -> tuple[np.ndarray, np.ndarray]:
    """(aorta, smaller vessels): the aorta touches the vertebral bodies' front."""
    # The body's outline is an ellipse 19 x 14 mm about (0, y0): at x = 9 its front
    # lies at y0 - 12.3; an aorta of radius 11 centred 22.5 mm in front touches it there.
    aorta = g.ellipse(9.0, y0 - 22.5, 11.0, 11.0)
    small = np.zeros(g.shape, dtype=bool)
    for side, radius in ((-1.0, 3.5), (1.0, 2.5)):  # azygos (right), hemiazygos (left)
        small |= g.ellipse(side * 17.5, y0 - 4.0, radius, radius)
    # Lumbar arteries: from the aorta round each side of a body, one per vertebra.
    for k in range(-8, 9):
        zk = f.zc + k * 26.0 + 15.0
        for side in (-1.0, 1.0):
            g.tube((side * 12.0, y0 - 13.0, zk), (side * 21.0, y0 + 4.0, zk - 4.0), 1.6,
                   out=small)
    return aorta, small & ~aorta


def _plaques(g: Slice, f: Frame, y0: float) -> np.ndarray:
    """Calcified plaques in the aorta's wall: patches of its rim, dense as cortex."""
    wall = g.ellipse(9.0, y0 - 22.5, 11.0, 11.0) & ~g.ellipse(9.0, y0 - 22.5, 9.0, 9.0)
    stretch = g.rows(np.mod(g.z - f.zc, 23.0) < 9.0)
    # On the left and front of the wall (away from the spine), a third of its round.
    side = g.cols(g.x > 12.0)
    return wall & stretch & side


def _costal_cartilages(g: Slice, f: Frame, b: float) -> tuple[np.ndarray, np.ndarray]:
    """(cartilage, its calcified parts): the costal arch in the anterior wall."""
    s = f.v.size
    # Each arch from near the midline down and out to a lower rib's end: (start, end,
    # radius of the cartilage, radius of its core).
    arches = (((12.0, -b + 20.0 * s, f.z(0.95)), (105.0 * s, -50.0 * s, f.z(0.0)), 6.0, 4.0),
              ((40.0 * s, -b + 26.0 * s, f.z(0.9)), (120.0 * s, -20.0 * s, f.z(0.3)), 5.0, 3.0))
    cartilage = np.zeros(g.shape, dtype=bool)
    core = np.zeros(g.shape, dtype=bool)
    for side in (-1.0, 1.0):
        for start, end, outer, inner in arches:
            p0, p1 = (side * start[0], *start[1:]), (side * end[0], *end[1:])
            g.tube(p0, p1, outer, out=cartilage)
            g.tube(p0, p1, inner, out=core)
    # Calcification: a rim over stretches of the cartilage, and nodules in its core.
    stretch = g.rows(np.mod(g.z - f.zc, 18.0) < 8.0)
    nodules = g.rows(np.mod(g.z - f.zc, 11.0) < 2.5) & g.cols(np.mod(g.x, 9.0) < 3.0)
    calcified = (cartilage & ~core & stretch) | (core & nodules)
    return cartilage, calcified


def _arms(g: Slice, f: Frame, hu: np.ndarray, a: float, resting: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Arms beside the abdomen, each humerus a 1.5 mm cortex round mixed marrow."""
    s = f.v.size
    empty = np.zeros(g.shape, dtype=bool)
    if f.v.arms != "side":
        return empty, empty, empty
    arm, bone, marrow = empty.copy(), empty.copy(), empty.copy()
    for side in (-1.0, 1.0):
        cx = side * (a + f.v.arm_gap_mm + 38.0 * s)
        arm |= g.ellipse(cx, 10.0, 38.0 * s, 42.0 * s) & resting
        bone |= g.ellipse(cx, 12.0, 9.5, 8.5)
        marrow |= g.ellipse(cx, 12.0, 8.0, 7.0)
    hu[arm] = SOFT
    hu[bone & arm] = f.v.cortex_hu
    hu[marrow & arm] = MIXED_MARROW
    return arm, bone & arm, marrow & arm


def abdomen(g: Slice, f: Frame, thickness: float) -> Site:
    v, s = f.v, f.v.size
    a, b = 160.0 * s, 110.0 * s
    hu, body, _, resting = couch_and_body(g, f, a, b, 104.0 * s, 18.0)
    arm, humeri, _ = _arms(g, f, hu, a, resting)
    body = body | arm
    zn = f.zn(g)
    y0 = 42.0 * s
    liver = g.ellipsoid((-70 * s, -5 * s, f.z(0.4)), (70 * s, 60 * s, 0.9 * f.zh))
    spleen = g.ellipsoid((85 * s, 25 * s, f.z(0.6)), (30 * s, 40 * s, 0.4 * f.zh))
    kidneys = (g.ellipsoid((-62 * s, y0 + 8, f.z(-0.2)), (24, 30, 0.5 * f.zh))
               | g.ellipsoid((62 * s, y0 + 8, f.z(-0.1)), (24, 30, 0.5 * f.zh)))
    hu[liver & body] = LIVER
    hu[spleen & body] = SPLEEN
    hu[kidneys] = KIDNEY
    upper = g.rows(zn > 0.1)
    rib = ribs(g, f, hu, a, b, thickness) & upper if upper.any() else np.zeros(g.shape, dtype=bool)
    vertebrae, canal, marrow = spine(g, f, hu, y0)
    aorta, small = _vessels_by_the_spine(g, f, y0)
    cava = g.ellipse(-24.0 * s, y0 - 20.0, 13.0, 10.0)
    hu[cava] = _contrast(f, 0.5)
    hu[small] = _contrast(f, 0.8)
    hu[aorta] = _contrast(f)
    plaques = _plaques(g, f, y0)
    hu[plaques] = PLAQUE
    cartilage, calcified = _costal_cartilages(g, f, b)
    cartilage &= body
    hu[cartilage] = CARTILAGE
    hu[calcified & body] = 0.55 * v.cortex_hu
    bones = (vertebrae & ~aorta & ~small) | (rib & ~cartilage) | humeri
    return hu, {"External": body, "Bones": bones & body, "SpinalCanal": canal,
                "SpinalCord": g.ellipse(0, y0 + 26.0, 4.5, 4.0), "A_Aorta": aorta,
                "Vessels": small | cava, "Cartilage": cartilage, "Humeri": humeri,
                "Kidneys": kidneys,
                "Liver": liver & body}, marrow
