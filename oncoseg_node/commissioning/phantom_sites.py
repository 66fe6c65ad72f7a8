"""The phantom sites: thorax, pelvis, head and abdomen, in patient coordinates (LPS).

Each returns the slice's HU image, its truth masks and where trabecular
marrow is (the caller adds its texture). In-plane sizes scale with the
variant's ``size``; the spine keeps an adult's dimensions.
"""

from __future__ import annotations

import numpy as np

from oncoseg_node.commissioning.phantom_abdomen import abdomen
from oncoseg_node.commissioning.phantom_body import (
    AIR,
    BLOOD,
    COUCH_CORE,
    COUCH_HALF_WIDTH,
    COUCH_SHELL,
    HEADREST,
    LUNG,
    MASK,
    METAL,
    SOFT,
    WATER,
    arms,
    couch_and_body,
    ribs,
    spine,
)
from oncoseg_node.commissioning.phantom_grid import Frame, Slice

Site = tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]


def _cortical(g: Slice, cx: float, cy: float, a: float, b: float, c: float,
              z: tuple[float, float] = (-np.inf, np.inf)) -> tuple[np.ndarray, np.ndarray]:
    """An elliptic bone: (whole bone, its marrow inside a ``c`` mm cortex)."""
    return g.ellipse(cx, cy, a, b, z), g.ellipse(cx, cy, a - c, b - c, z)


def _enhanced(f: Frame) -> float:
    return f.v.contrast_hu if f.v.contrast_hu > 0 else BLOOD


def thorax(g: Slice, f: Frame, thickness: float) -> Site:
    v, s = f.v, f.v.size
    a, b = 170.0 * s, 115.0 * s
    hu, body, _, resting = couch_and_body(g, f, a, b, 108.0 * s, 10.0)
    arm, humeri, humeral_marrow = arms(g, f, hu, a, resting)
    body = body | arm
    zn = f.zn(g)
    y0 = 58.0 * s
    vertebrae, canal, marrow = spine(g, f, hu, y0)
    sternum, sternal_marrow = _cortical(g, 0, -b + 22 * s, 18, 7, v.cortex_mm)
    sternum &= g.rows(zn > -0.3)
    sternal_marrow &= g.rows(zn > -0.3)
    # Scapulae: thin plates behind the upper ribs, cortex around a little marrow.
    sector = g.rows(g.y > 45 * s) & g.cols((np.abs(g.x) > 45 * s) & (np.abs(g.x) < 125 * s))
    upper = g.rows(zn > -0.15)
    scapulae = g.ellipse(0, 0, a - 3, b - 3) & ~g.ellipse(0, 0, a - 10, b - 10) & sector & upper
    scapular_marrow = (g.ellipse(0, 0, a - 3 - v.cortex_mm, b - 3 - v.cortex_mm)
                       & ~g.ellipse(0, 0, a - 10 + v.cortex_mm, b - 10 + v.cortex_mm)
                       & sector & upper)
    # Airways: trachea above the carina, main bronchi from the carina into each lung.
    carina = (0.0, 12.0 * s, f.z(0.25))
    trachea_outer = g.ellipse(0, 12 * s, 10, 10, z=(carina[2], np.inf))
    trachea_air = g.ellipse(0, 12 * s, 8.5, 8.5, z=(carina[2], np.inf))
    bronchus_outer = np.zeros(g.shape, dtype=bool)
    bronchus_air = np.zeros(g.shape, dtype=bool)
    for side in (-1.0, 1.0):
        end = (side * 55.0 * s, 28.0 * s, carina[2] - min(45.0, 0.5 * f.zh))
        bronchus_outer |= g.tube(carina, end, 7.5)
        bronchus_air |= g.tube(carina, end, 6.0)
    bronchus_outer &= ~trachea_outer
    airway_outer = trachea_outer | bronchus_outer
    heart = g.ellipsoid((12 * s, -22 * s, f.z(-0.35)), (55 * s, 48 * s, 0.42 * f.zh))
    # Descending aorta left of the vertebral bodies, a few mm off their front.
    aorta = g.ellipse(22 * s, y0 - 28, 12, 12)
    esophagus = g.ellipse(6 * s, 36 * s, 8, 6) & ~aorta
    esophagus_air = g.ellipse(6 * s, 36 * s, 2.5, 2.0) & g.rows(np.mod(g.z - f.zc, 40.0) < 12.0)
    # Posterior mediastinum: aorta, oesophagus and the spine's front, one smooth outline.
    mediastinum = heart | esophagus | airway_outer | g.ellipse(8 * s, y0 - 14, 30, 30) \
        | g.ellipse(0, y0 + 10, 32, 34)
    lobes_l = (g.ellipsoid((68 * s, 8 * s, f.z(-0.05)), (60 * s, 72 * s, 0.78 * f.zh))
               | g.ellipsoid((28 * s, -40 * s, f.z(0.15)), (32 * s, 28 * s, 0.45 * f.zh)))
    lobes_r = (g.ellipsoid((-68 * s, 8 * s, f.z(-0.05)), (62 * s, 72 * s, 0.8 * f.zh))
               | g.ellipsoid((-28 * s, -40 * s, f.z(0.15)), (32 * s, 28 * s, 0.45 * f.zh)))
    # Anterior junction: the lungs meet in a 2 mm septum on the midline.
    lung_l = lobes_l & g.cols(g.x > 1.0) & ~mediastinum
    lung_r = lobes_r & g.cols(g.x < -1.0) & ~mediastinum
    lungs = lung_l | lung_r
    # Dependent lung is denser (gravity toward the couch); texture adds +-15 HU.
    depth = np.clip((f.down * g.y + 64.0 * s) / (144.0 * s), 0.0, 1.0)
    texture = (15.0 * np.sin(g.y / 11.0 + 0.7) * np.sin(g.z / 13.0 + 1.3))[:, None] \
        * np.sin(g.x / 9.0)[None, :]
    parenchyma = (LUNG + 70.0 * depth)[:, None] + texture
    hu[lungs] = parenchyma[lungs]
    vessels = np.zeros(g.shape, dtype=bool)
    for p0, p1, radius in f.vessels:
        g.tube([p0[0] * s, p0[1] * s, p0[2]], [p1[0] * s, p1[1] * s, p1[2]], radius, out=vessels)
    hu[vessels & lungs] = BLOOD
    hu[heart] = BLOOD
    hu[aorta] = _enhanced(f)
    hu[esophagus] = SOFT
    hu[esophagus_air] = AIR
    hu[airway_outer] = SOFT
    hu[trachea_air | (bronchus_air & ~trachea_outer)] = AIR
    rib = ribs(g, f, hu, a, b, thickness)
    hu[sternum | scapulae] = v.cortex_hu
    hu[sternal_marrow | scapular_marrow] = v.marrow_hu
    metal = np.zeros(g.shape, dtype=bool)
    if v.metal:  # an implanted port in the anterior chest wall
        metal = g.ellipsoid((-70 * s, -b + 18 * s, f.z(0.4)), (9, 5, 6))
        hu[metal] = METAL
    bones = (vertebrae | rib | sternum | scapulae | humeri) & body & ~metal
    return hu, {
        "External": body, "Lung_L": lung_l, "Lung_R": lung_r, "Lungs": lungs,
        "Heart": heart, "Esophagus": esophagus, "Trachea": trachea_outer,
        "Bronchus": bronchus_outer, "SpinalCanal": canal, "A_Aorta": aorta,
        "Bones": bones,
    }, marrow | sternal_marrow | scapular_marrow


def pelvis(g: Slice, f: Frame, thickness: float) -> Site:
    v, s = f.v, f.v.size
    a, b = 185.0 * s, 120.0 * s
    hu, body, _, resting = couch_and_body(g, f, a, b, 112.0 * s, 15.0)
    arm, humeri, _ = arms(g, f, hu, a, resting, near_shoulders=False)
    body = body | arm
    zn = f.zn(g)
    c = v.cortex_mm
    upper, lower = g.rows(zn > 0.0), g.rows(zn < -0.35)
    y0 = 52.0 * s
    lumbar, canal, marrow = spine(g, f, hu, y0, f.z(0.4))  # lumbar spine above the sacrum
    wing_marrow = np.zeros(g.shape, dtype=bool)
    wings = np.zeros(g.shape, dtype=bool)
    for side in (-1.0, 1.0):
        cx = side * 95.0 * s
        wings |= g.ellipse(cx, 20 * s, 30, 55) & ~g.ellipse(cx, 20 * s, 22, 47) & upper
        wing_marrow |= (g.ellipse(cx, 20 * s, 30 - c, 55 - c)
                        & ~g.ellipse(cx, 20 * s, 22 + c, 47 + c) & upper)
    sacral = g.rows((zn > -0.3) & (zn <= 0.4))
    sacrum, sacral_marrow = _cortical(g, 0, y0 + 20, 34, 15, c)
    sacral_canal = g.ellipse(0, y0 + 26, 9, 5) & sacral
    sacrum &= sacral
    sacral_marrow &= sacral & ~sacral_canal
    heads = np.zeros(g.shape, dtype=bool)
    head_marrow = np.zeros(g.shape, dtype=bool)
    for side in (-1.0, 1.0):
        bone, inside = _cortical(g, side * 92 * s, 5 * s, 23, 23, 3.0)
        heads |= bone & lower
        head_marrow |= inside & lower
    pubis = np.zeros(g.shape, dtype=bool)
    pubic_marrow = np.zeros(g.shape, dtype=bool)
    for side in (-1.0, 1.0):
        bone, inside = _cortical(g, side * 40 * s, -72 * s, 14, 11, c)
        pubis |= bone & lower
        pubic_marrow |= inside & lower
    bladder = g.ellipsoid((0, -45 * s, f.z(-0.3)), (45 * s, 35 * s, 0.35 * f.zh))
    rectum = g.ellipse(0, 40 * s, 18, 15, z=(-np.inf, f.z(0.3)))
    gas = g.ellipse(0, 40 * s, 14, 10, z=(f.z(-0.7), f.z(0.2)))
    # Colon gas: a pocket of pure air as large as a small lung, to be told from one.
    gas |= g.ellipsoid((-45 * s, -55 * s, f.z(0.55)), (38 * s, 24 * s, 0.3 * f.zh))
    # Small bowel loops with oral contrast: tubes as dense as bone, nowhere near one.
    loops = np.zeros(g.shape, dtype=bool)
    for p0, p1, r in (((70, -70, 0.95), (10, -95, 0.25), 11.0),
                      ((45, -40, 0.98), (-25, -15, 0.45), 10.0),
                      ((0, -95, 0.7), (55, -55, 0.15), 9.0)):
        g.tube((p0[0] * s, p0[1] * s, f.z(p0[2])), (p1[0] * s, p1[1] * s, f.z(p1[2])), r,
               out=loops)
    hu[wings | sacrum | heads | pubis] = v.cortex_hu
    hu[wing_marrow | sacral_marrow | head_marrow | pubic_marrow] = v.marrow_hu
    hu[sacral_canal] = WATER
    hu[bladder] = WATER
    hu[rectum] = SOFT
    hu[loops & ~bladder] = _enhanced(f) if v.contrast_hu > 0 else SOFT
    hu[gas & ~wings] = AIR
    metal = np.zeros(g.shape, dtype=bool)
    if v.metal:  # a hip prosthesis: the left femoral head is a metal ball
        metal = g.ellipse(92 * s, 5 * s, 22, 22) & lower
        hu[metal] = METAL
    bones = (lumbar | wings | sacrum | heads | pubis | humeri) & body & ~metal
    return hu, {"External": body, "Bones": bones, "SpinalCanal": canal | sacral_canal,
                "Bladder": bladder, "Rectum": rectum}, \
        marrow | wing_marrow | sacral_marrow | (head_marrow & ~metal) | pubic_marrow


def head(g: Slice, f: Frame, thickness: float) -> Site:
    v = f.v
    hu = np.full(g.shape, AIR, dtype=np.float32)
    depth = f.down * g.y
    a, b, c = 75.0, 92.0, 1.7 * f.zh
    flat = b + 25.0  # the head rests in a foam headrest, off the couch
    across = np.abs(g.x) <= COUCH_HALF_WIDTH
    for lo, hi, value in ((flat, flat + 3, COUCH_SHELL), (flat + 3, flat + 42, COUCH_CORE),
                          (flat + 42, flat + 45, COUCH_SHELL)):
        hu[g.rows((depth >= lo) & (depth < hi)) & g.cols(across)] = value
    centre = (0, 0, f.zc)
    body = g.ellipsoid(centre, (a, b, c))
    skull = g.ellipsoid(centre, (a - 5, b - 5, c)) & ~g.ellipsoid(centre, (a - 11, b - 11, c))
    # Diploe: marrow between the outer and inner tables.
    diploe = g.ellipsoid(centre, (a - 7, b - 7, c)) & ~g.ellipsoid(centre, (a - 9, b - 9, c))
    brain = g.ellipsoid(centre, (a - 11, b - 11, c))
    headrest = g.rows((depth > 40) & (depth < flat)) & g.cols(np.abs(g.x) < 70) & ~body
    # Thermoplastic mask 6 mm off the skin, strapped down to the couch at both sides.
    shell = (g.ellipsoid(centre, (a + 8, b + 8, c + 8))
             & ~g.ellipsoid(centre, (a + 6, b + 6, c + 6)) & g.rows(depth < 30))
    straps = g.rows((depth >= 30) & (depth < flat)) & \
        g.cols((np.abs(g.x) >= a + 6) & (np.abs(g.x) < a + 8))
    hu[headrest] = HEADREST
    hu[shell | straps] = MASK
    hu[body] = SOFT
    hu[brain] = 35.0
    hu[skull] = 1.3 * v.cortex_hu
    hu[diploe] = v.marrow_hu
    return hu, {"External": body, "Bones": skull & body, "Brain": brain}, diploe


SITES = {"thorax": thorax, "pelvis": pelvis, "head": head, "abdomen": abdomen}
