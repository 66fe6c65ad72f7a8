"""A synthetic CT series with known organs, for tests, demos and benchmarks.

The anatomy is defined analytically in DICOM patient coordinates (LPS: +x
toward the patient's left, +y posterior, +z toward the head) and sampled at
every voxel centre of the requested image grid; ``truth`` masks are exactly
those samples. Patient position (HFS, HFP, FFS, FFP), anisotropic pixels,
non-uniform slice spacing and gantry tilt therefore change only the grid.

The anatomy is scaled along z to the scanned length, so every organ appears
in a scan of any length. What makes it a fair test of an engine rather than
a drawing: the patient lies on a couch with the back (or, prone, the front)
flattened against its top; lungs carry a gravity gradient, texture and
vessels; trachea and main bronchi are air tubes that enter the lungs; the
lungs touch at an anterior junction; vertebrae have marrow and discs, so
the spinal canal is enclosed by bone only between discs; the pelvis has
rectal gas and the head a thermoplastic mask and a headrest. Image edges
get about a pixel of blur (partial volume) and all voxels Gaussian noise.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from oncoseg_node import __version__
from oncoseg_node.contouring.volume import Volume, volume_from_datasets
from oncoseg_node.dicom.filemeta import IMPLEMENTATION_CLASS_UID

# ImageOrientationPatient (row direction, column direction) per patient position.
ORIENTATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "HFS": ((1, 0, 0), (0, 1, 0)),
    "HFP": ((-1, 0, 0), (0, -1, 0)),
    "FFS": ((-1, 0, 0), (0, 1, 0)),
    "FFP": ((1, 0, 0), (0, -1, 0)),
}
SITES = ("thorax", "head", "pelvis")
BODY_PART = {"thorax": "CHEST", "head": "HEAD", "pelvis": "PELVIS"}

AIR, LUNG, FAT, SOFT, BLOOD, CSF, WATER = -1000.0, -860.0, -100.0, 40.0, 45.0, 20.0, 10.0
MARROW, CORTEX, RIB, DISC = 230.0, 750.0, 480.0, 80.0
COUCH_SHELL, COUCH_CORE, HEADREST, MASK = 200.0, -750.0, -600.0, 150.0
NOISE_SD = 15.0
COUCH_HALF_WIDTH = 265.0  # a radiotherapy couch top is about 53 cm wide
DISC_PERIOD, DISC_MM = 26.0, 5.0


@dataclass(frozen=True, eq=False)
class Phantom:
    """CT slices sorted along the slice normal, truth masks on the same (z, y, x) grid."""

    datasets: list[Dataset]
    truth: dict[str, np.ndarray]
    volume: Volume


class _Slice:
    """Patient coordinates of one slice's voxel centres, kept separable.

    Every supported orientation has its row direction along patient x and its
    column direction in the y-z plane (gantry tilt rotates it about x), so x
    depends only on the column and y, z only on the row. Shapes are evaluated
    on those vectors inside their bounding box and broadcast, which is what
    makes a 512x512 slice cost a few milliseconds.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> None:
        self.x, self.y, self.z = x, y, z
        self.shape = (len(y), len(x))
        self.z_range = (float(z.min()), float(z.max()))

    def _box(self, rows_ok: np.ndarray, x_lo: float, x_hi: float
             ) -> tuple[slice, slice] | None:
        rows = np.flatnonzero(rows_ok)
        cols = np.flatnonzero((self.x >= x_lo) & (self.x <= x_hi))
        if rows.size == 0 or cols.size == 0:
            return None
        return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)

    def ellipsoid(self, c: Sequence[float], r: Sequence[float]) -> np.ndarray:
        """Ellipsoid; an infinite z radius gives an elliptic cylinder along z."""
        out = np.zeros(self.shape, dtype=bool)
        dyz = ((self.y - c[1]) / r[1]) ** 2 + ((self.z - c[2]) / r[2]) ** 2
        box = self._box(dyz <= 1.0, c[0] - r[0], c[0] + r[0])
        if box is not None:
            rs, cs = box
            out[rs, cs] = dyz[rs, None] + ((self.x[None, cs] - c[0]) / r[0]) ** 2 <= 1.0
        return out

    def ellipse(self, cx: float, cy: float, a: float, b: float,
                z: tuple[float, float] = (-np.inf, np.inf)) -> np.ndarray:
        """Elliptic cylinder along z, optionally cut to ``z`` (lo, hi)."""
        out = self.ellipsoid((cx, cy, 0.0), (a, b, np.inf))
        out &= ((self.z >= z[0]) & (self.z <= z[1]))[:, None]
        return out

    def tube(self, p0: Sequence[float], p1: Sequence[float], radius: float,
             out: np.ndarray | None = None) -> np.ndarray:
        """Round tube (axial cross-section a disc) whose centre runs p0 -> p1, linear in z.

        With ``out`` the tube is added to that mask (many small tubes, one array).
        """
        if out is None:
            out = np.zeros(self.shape, dtype=bool)
        z_lo, z_hi = sorted((p0[2], p1[2]))
        if z_hi < self.z_range[0] or z_lo > self.z_range[1]:
            return out
        t = (self.z - p0[2]) / (p1[2] - p0[2])
        box = self._box((self.z >= z_lo) & (self.z <= z_hi),
                        min(p0[0], p1[0]) - radius, max(p0[0], p1[0]) + radius)
        if box is not None:
            rs, cs = box
            cx = p0[0] + t[rs] * (p1[0] - p0[0])
            cy = p0[1] + t[rs] * (p1[1] - p0[1])
            out[rs, cs] |= ((self.x[None, cs] - cx[:, None]) ** 2
                            + ((self.y[rs] - cy) ** 2)[:, None]) <= radius * radius
        return out

    def rows(self, condition: np.ndarray) -> np.ndarray:
        return condition[:, None]

    def cols(self, condition: np.ndarray) -> np.ndarray:
        return condition[None, :]


@dataclass(frozen=True)
class _Frame:
    """Where the anatomy sits: scan centre and half length along z, couch side."""

    zc: float
    zh: float
    down: float  # +1: couch on the posterior side (supine); -1: anterior (prone)
    vessels: tuple[tuple[tuple[float, ...], tuple[float, ...], float], ...]

    def zn(self, g: _Slice) -> np.ndarray:
        return (g.z - self.zc) / self.zh

    def z(self, fraction: float) -> float:
        return self.zc + fraction * self.zh


def _couch_and_body(g: _Slice, f: _Frame, a: float, b: float, flat: float, fat_mm: float
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HU image with couch and body (fat over soft tissue); (hu, body, inner)."""
    hu = np.full(g.shape, AIR, dtype=np.float32)
    depth = f.down * g.y  # distance toward the couch
    across = np.abs(g.x) <= COUCH_HALF_WIDTH
    for lo, hi, value in ((flat, flat + 3, COUCH_SHELL), (flat + 3, flat + 42, COUCH_CORE),
                          (flat + 42, flat + 45, COUCH_SHELL)):
        hu[g.rows((depth >= lo) & (depth < hi)) & g.cols(across)] = value
    # The patient lies on the couch: soft tissue flattens against its top.
    body = g.ellipse(0, 0, a, b) & g.rows(depth < flat)
    inner = g.ellipse(0, 0, a - fat_mm, b - fat_mm) & g.rows(depth < flat - fat_mm)
    hu[body] = FAT
    hu[inner] = SOFT
    return hu, body, inner


def _spine(g: _Slice, f: _Frame, hu: np.ndarray, y0: float, z_lo: float = -np.inf
           ) -> tuple[np.ndarray, np.ndarray]:
    """Vertebrae above ``z_lo`` (cortex, marrow; discs between), arch around the canal."""
    disc = g.rows(np.mod(g.z - f.zc, DISC_PERIOD) < DISC_MM)
    z = (z_lo, np.inf)
    vbody = g.ellipse(0, y0, 19, 14, z) & ~disc
    marrow = g.ellipse(0, y0, 17, 12, z) & ~disc
    canal = g.ellipse(0, y0 + 26, 8, 7, z)
    arch = g.ellipse(0, y0 + 26, 16, 14, z) & ~canal
    # At a disc the arch is open in front, so bone no longer encloses the canal there.
    arch &= ~disc | g.rows(g.y > y0 + 26)
    spinous = g.ellipse(0, y0 + 42, 4, 7, z)
    hu[g.ellipse(0, y0, 19, 14, z) & disc] = DISC
    hu[vbody] = CORTEX
    hu[marrow] = MARROW
    hu[arch | spinous] = CORTEX
    hu[canal] = CSF
    return vbody | arch | spinous, canal


def _thorax(g: _Slice, f: _Frame) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    a, b = 170.0, 115.0
    hu, body, _ = _couch_and_body(g, f, a, b, 108.0, 10.0)
    zn = f.zn(g)
    bones, canal = _spine(g, f, hu, 58.0)
    # Ribs: 8 mm bands inside the chest wall, sloping caudally toward the front.
    ring = g.ellipse(0, 0, a - 14, b - 14) & ~g.ellipse(0, 0, a - 22, b - 22)
    band = np.mod(g.z - f.zc - 0.25 * g.y, 25.0) < 10.0
    ribs = ring & g.rows(band & (g.y > -70)) & g.cols(np.abs(g.x) > 35)
    sternum = g.ellipse(0, -b + 22, 18, 7) & g.rows(zn > -0.3)
    # Airways: trachea above the carina, main bronchi from the carina into each lung.
    carina = (0.0, 12.0, f.z(0.25))
    trachea_outer = g.ellipse(0, 12, 10, 10, z=(carina[2], np.inf))
    trachea_air = g.ellipse(0, 12, 8.5, 8.5, z=(carina[2], np.inf))
    bronchus_outer = np.zeros(g.shape, dtype=bool)
    bronchus_air = np.zeros(g.shape, dtype=bool)
    for side in (-1.0, 1.0):
        end = (side * 50.0, 30.0, f.z(-0.35))
        bronchus_outer |= g.tube(carina, end, 7.5)
        bronchus_air |= g.tube(carina, end, 6.0)
    bronchus_outer &= ~trachea_outer
    airway_outer = trachea_outer | bronchus_outer
    heart = g.ellipsoid((12, -22, f.z(-0.35)), (55, 48, 0.42 * f.zh))
    esophagus = g.ellipse(6, 36, 8, 6)
    esophagus_air = g.ellipse(6, 36, 2.5, 2.0) & g.rows(np.mod(g.z - f.zc, 40.0) < 12.0)
    mediastinum = heart | esophagus | airway_outer
    lobes_l = (g.ellipsoid((68, 8, f.z(-0.05)), (60, 72, 0.78 * f.zh))
               | g.ellipsoid((28, -40, f.z(0.15)), (32, 28, 0.45 * f.zh)))
    lobes_r = (g.ellipsoid((-68, 8, f.z(-0.05)), (62, 72, 0.8 * f.zh))
               | g.ellipsoid((-28, -40, f.z(0.15)), (32, 28, 0.45 * f.zh)))
    # Anterior junction: the lungs meet in a 2 mm septum on the midline.
    lung_l = lobes_l & g.cols(g.x > 1.0) & ~mediastinum
    lung_r = lobes_r & g.cols(g.x < -1.0) & ~mediastinum
    lungs = lung_l | lung_r
    # Dependent lung is denser (gravity toward the couch); texture adds +-15 HU.
    depth = np.clip((f.down * g.y + 64.0) / 144.0, 0.0, 1.0)
    texture = (15.0 * np.sin(g.y / 11.0 + 0.7) * np.sin(g.z / 13.0 + 1.3))[:, None] \
        * np.sin(g.x / 9.0)[None, :]
    parenchyma = (LUNG + 70.0 * depth)[:, None] + texture
    hu[lungs] = parenchyma[lungs]
    vessels = np.zeros(g.shape, dtype=bool)
    for p0, p1, radius in f.vessels:
        g.tube(p0, p1, radius, out=vessels)
    hu[vessels & lungs] = BLOOD
    hu[heart] = BLOOD
    hu[esophagus] = SOFT
    hu[esophagus_air] = AIR
    hu[airway_outer] = SOFT
    hu[trachea_air | (bronchus_air & ~trachea_outer)] = AIR
    hu[ribs] = RIB
    hu[sternum] = RIB
    return hu, {
        "External": body, "Lung_L": lung_l, "Lung_R": lung_r, "Lungs": lungs,
        "Heart": heart, "Esophagus": esophagus, "Trachea": trachea_outer,
        "Bronchus": bronchus_outer, "SpinalCanal": canal,
        "Bones": (bones | ribs | sternum) & body,
    }


def _pelvis(g: _Slice, f: _Frame) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    hu, body, _ = _couch_and_body(g, f, 185.0, 120.0, 112.0, 15.0)
    zn = f.zn(g)
    upper, lower = g.rows(zn > 0.0), g.rows(zn < -0.35)
    spine, canal = _spine(g, f, hu, 52.0, f.z(0.4))  # lumbar spine above the sacrum
    wings = (g.ellipse(-95, 20, 30, 55) | g.ellipse(95, 20, 30, 55)) & \
        ~(g.ellipse(-95, 20, 22, 47) | g.ellipse(95, 20, 22, 47)) & upper
    sacrum = g.ellipse(0, 78, 32, 14) & g.rows((zn > -0.3) & (zn <= 0.4))
    heads = (g.ellipse(-92, 5, 23, 23) | g.ellipse(92, 5, 23, 23)) & lower
    head_marrow = (g.ellipse(-92, 5, 19, 19) | g.ellipse(92, 5, 19, 19)) & lower
    pubis = (g.ellipse(-40, -72, 14, 11) | g.ellipse(40, -72, 14, 11)) & lower
    bladder = g.ellipsoid((0, -45, f.z(-0.3)), (45, 35, 0.35 * f.zh))
    rectum = g.ellipse(0, 40, 18, 15, z=(-np.inf, f.z(0.3)))
    gas = g.ellipse(0, 40, 14, 10, z=(f.z(-0.7), f.z(0.2)))
    # Colon gas: a pocket of pure air as large as a small lung, to be told from one.
    gas |= g.ellipsoid((-45, -55, f.z(0.55)), (38, 24, 0.3 * f.zh))
    hu[wings | sacrum | heads | pubis] = CORTEX
    hu[head_marrow] = MARROW
    hu[bladder] = WATER
    hu[rectum] = SOFT
    hu[gas & ~wings] = AIR
    bones = (spine | wings | sacrum | heads | pubis) & body
    return hu, {"External": body, "Bones": bones, "SpinalCanal": canal,
                "Bladder": bladder, "Rectum": rectum}


def _head(g: _Slice, f: _Frame) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    hu = np.full(g.shape, AIR, dtype=np.float32)
    depth = f.down * g.y
    a, b, c = 75.0, 92.0, 1.7 * f.zh
    flat = b + 25.0  # the head rests in a foam headrest, off the couch
    across = np.abs(g.x) <= COUCH_HALF_WIDTH
    for lo, hi, value in ((flat, flat + 3, COUCH_SHELL), (flat + 3, flat + 42, COUCH_CORE),
                          (flat + 42, flat + 45, COUCH_SHELL)):
        hu[g.rows((depth >= lo) & (depth < hi)) & g.cols(across)] = value
    body = g.ellipsoid((0, 0, f.zc), (a, b, c))
    skull = g.ellipsoid((0, 0, f.zc), (a - 5, b - 5, c)) & \
        ~g.ellipsoid((0, 0, f.zc), (a - 11, b - 11, c))
    brain = g.ellipsoid((0, 0, f.zc), (a - 11, b - 11, c))
    headrest = g.rows((depth > 40) & (depth < flat)) & g.cols(np.abs(g.x) < 70) & ~body
    # Thermoplastic mask 6 mm off the skin, strapped down to the couch at both sides.
    shell = (g.ellipsoid((0, 0, f.zc), (a + 8, b + 8, c + 8))
             & ~g.ellipsoid((0, 0, f.zc), (a + 6, b + 6, c + 6)) & g.rows(depth < 30))
    straps = g.rows((depth >= 30) & (depth < flat)) & \
        g.cols((np.abs(g.x) >= a + 6) & (np.abs(g.x) < a + 8))
    hu[headrest] = HEADREST
    hu[shell | straps] = MASK
    hu[body] = SOFT
    hu[brain] = 35.0
    hu[skull] = CORTEX
    return hu, {"External": body, "Bones": skull & body, "Brain": brain}


ANATOMY = {"thorax": _thorax, "pelvis": _pelvis, "head": _head}


def _vessels(rng: np.random.Generator, zc: float, zh: float
             ) -> tuple[tuple[tuple[float, ...], tuple[float, ...], float], ...]:
    """Pulmonary vessel segments inside each lung (drawn only where lung is)."""
    out = []
    for side in (-1.0, 1.0):
        for _ in range(36):
            u = rng.uniform(-0.65, 0.65, 3)
            p0 = (side * (68 + 60 * u[0]), 8 + 72 * u[1], zc - 0.05 * zh + 0.78 * zh * u[2])
            length = rng.uniform(15, 50)
            dx, dy = rng.uniform(-0.6, 0.6, 2)
            dz = rng.choice((-1.0, 1.0)) * length
            p1 = (p0[0] + dx * length, p0[1] + dy * length, p0[2] + dz)
            out.append((p0, p1, float(rng.uniform(1.2, 3.0))))
    return tuple(out)


def _blur(hu: np.ndarray) -> np.ndarray:
    """[1, 2, 1] / 4 along rows and columns: about one pixel of partial volume."""
    out = hu.copy()
    out[1:-1] = 0.5 * hu[1:-1] + 0.25 * (hu[:-2] + hu[2:])
    tmp = out.copy()
    out[:, 1:-1] = 0.5 * tmp[:, 1:-1] + 0.25 * (tmp[:, :-2] + tmp[:, 2:])
    return out


def make_phantom(*, slices: int = 96, rows: int = 512, columns: int = 512,
                 pixel_spacing: tuple[float, float] = (0.9765625, 0.9765625),
                 slice_thickness: float = 3.0, patient_position: str = "HFS",
                 site: str = "thorax", slice_offsets: Sequence[float] | None = None,
                 gantry_tilt_deg: float = 0.0, seed: int = 0,
                 patient_id: str = "PHANTOM001", series_description: str | None = None
                 ) -> Phantom:
    """Build the phantom in memory; see the module docstring for conventions.

    ``pixel_spacing`` is DICOM PixelSpacing (between rows, between columns).
    ``slice_offsets`` (mm along the table axis) overrides the uniform spacing.
    ``gantry_tilt_deg`` rotates the image plane about the patient's x axis
    while the table still advances along z, so positions are sheared
    relative to the slice normal, as on a tilted scanner. The same arguments
    give the same pixels and UIDs.
    """
    if patient_position not in ORIENTATIONS:
        raise ValueError(f"patient_position must be one of {sorted(ORIENTATIONS)}")
    if site not in SITES:
        raise ValueError(f"site must be one of {SITES}")
    row_dir = np.array(ORIENTATIONS[patient_position][0], dtype=float)
    col_flat = np.array(ORIENTATIONS[patient_position][1], dtype=float)
    table = np.cross(row_dir, col_flat)  # +-z: the direction the table moves
    tilt = np.radians(gantry_tilt_deg)
    col_dir = np.array([0.0, col_flat[1] * np.cos(tilt), col_flat[1] * np.sin(tilt)])
    offsets = np.sort(np.asarray(slice_offsets, dtype=float) if slice_offsets is not None
                      else (np.arange(slices) - (slices - 1) / 2) * slice_thickness)
    dr, dc = float(pixel_spacing[0]), float(pixel_spacing[1])
    first = -((columns - 1) * dc / 2) * row_dir - ((rows - 1) * dr / 2) * col_dir
    table_z = offsets * table[2]
    zc = float(table_z.min() + table_z.max()) / 2
    zh = max(float(table_z.max() - table_z.min()) / 2 + slice_thickness / 2, 10.0)
    frame = _Frame(zc, zh, 1.0 if patient_position.endswith("S") else -1.0,
                   _vessels(np.random.default_rng([seed, 1]), zc, zh))
    noise = np.random.default_rng([seed, 2])
    entropy = [str(v) for v in (seed, site, patient_position, rows, columns, pixel_spacing,
                                slice_thickness, list(offsets), gantry_tilt_deg, patient_id,
                                series_description)]
    study_uid, series_uid, frame_uid = (generate_uid(entropy_srcs=[*entropy, kind])
                                        for kind in ("study", "series", "frame"))
    description = series_description or f"Phantom {site} {patient_position}"
    datasets, truths = [], []
    for k, offset in enumerate(offsets):
        ipp = first + offset * table
        grid = _Slice(ipp[0] + np.arange(columns) * dc * row_dir[0],
                      ipp[1] + np.arange(rows) * dr * col_dir[1],
                      ipp[2] + np.arange(rows) * dr * col_dir[2])
        hu, truth = ANATOMY[site](grid, frame)
        hu = _blur(hu) + noise.standard_normal(hu.shape, dtype=np.float32) * NOISE_SD
        stored = np.clip(np.rint(hu + 1024.0), 0, 4095).astype(np.uint16)
        ds = _slice_dataset(stored, k, ipp, row_dir, col_dir, (dr, dc), slice_thickness,
                            patient_position, site, description, gantry_tilt_deg, patient_id)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[*entropy, "instance", str(k)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        datasets.append(ds)
        truths.append(truth)
    truth_volume = {name: np.stack([t[name] for t in truths]) for name in truths[0]}
    return Phantom(datasets, truth_volume, volume_from_datasets(datasets))


def _ds(value: float) -> str:
    """A DS value within 16 characters, without float noise."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


_WHEN = _dt.datetime(2026, 1, 15, 9, 30, 0)


def _slice_dataset(pixels: np.ndarray, index: int, ipp: np.ndarray, row_dir: np.ndarray,
                   col_dir: np.ndarray, spacing: tuple[float, float], thickness: float,
                   position: str, site: str, description: str, tilt: float,
                   patient_id: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    date, time = _WHEN.strftime("%Y%m%d"), _WHEN.strftime("%H%M%S")
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
    ds.AccessionNumber = "PH0001"
    ds.Modality = "CT"
    ds.Manufacturer = "oncoseg-node phantom"
    ds.InstitutionName = "Synthetic"
    ds.ReferringPhysicianName = ""
    ds.StationName = "PHANTOM"
    ds.StudyDescription = "CT simulation (synthetic phantom)"
    ds.SeriesDescription = description
    ds.ManufacturerModelName = "phantom"
    ds.PatientName = "Phantom^Synthetic"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = BODY_PART[site]
    ds.SliceThickness = _ds(thickness)
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.SoftwareVersions = __version__
    ds.ReconstructionDiameter = _ds(pixels.shape[1] * spacing[1])
    ds.GantryDetectorTilt = _ds(tilt)
    ds.TableHeight = "150"
    ds.RotationDirection = "CW"
    ds.XRayTubeCurrent = 300
    ds.ConvolutionKernel = "STANDARD"
    ds.PatientPosition = position
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [_ds(v) for v in ipp]
    ds.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds(float(ipp @ np.cross(row_dir, col_dir)))
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [_ds(spacing[0]), _ds(spacing[1])]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.PixelData = pixels.tobytes()
    return ds


def write_phantom(out_dir: Path, renew: Callable[[Phantom], Phantom] | None = None,
                  **kwargs: object) -> Phantom:
    """Write the phantom as ``CT000001.dcm``... in ``out_dir`` and return it.

    ``renew`` transforms the phantom before it is written (new UIDs, say).
    """
    phantom = make_phantom(**kwargs)  # type: ignore[arg-type]
    if renew is not None:
        phantom = renew(phantom)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for ds in phantom.datasets:
        pydicom.dcmwrite(out_dir / f"CT{int(ds.InstanceNumber):06d}.dcm", ds,
                         enforce_file_format=True)
    return phantom
