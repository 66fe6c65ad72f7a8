"""A synthetic CT series with known organs, for tests, demos and benchmarks.

The anatomy is defined analytically in DICOM patient coordinates (LPS: +x
toward the patient's left, +y posterior, +z toward the head), then sampled
at every voxel centre of the requested image grid. Patient position
(HFS, HFP, FFS, FFP), anisotropic pixels, non-uniform slice spacing and
gantry tilt therefore change only the grid, and the ground truth stays exact.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from . import __version__
from .dicom.filemeta import IMPLEMENTATION_CLASS_UID
from .volume import CT_IMAGE_STORAGE, Volume, volume_from_datasets

# ImageOrientationPatient (row direction, column direction) per patient position.
ORIENTATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "HFS": ((1, 0, 0), (0, 1, 0)),
    "HFP": ((-1, 0, 0), (0, -1, 0)),
    "FFS": ((-1, 0, 0), (0, 1, 0)),
    "FFP": ((1, 0, 0), (0, -1, 0)),
}
SITES = ("thorax", "head", "pelvis")
AIR, LUNG, FAT, SOFT, BONE, COUCH_SHELL, COUCH_FOAM = -1000, -850, -100, 40, 500, 200, -850


@dataclass(frozen=True, eq=False)
class Phantom:
    """CT slices sorted along the slice normal, truth masks on the same (z, y, x) grid."""

    datasets: list[Dataset]
    truth: dict[str, np.ndarray]
    volume: Volume


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float
             ) -> np.ndarray:
    return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1.0


def _ellipsoid(x: np.ndarray, y: np.ndarray, z: np.ndarray, c: Sequence[float],
               r: Sequence[float]) -> np.ndarray:
    return (((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2
            + ((z - c[2]) / r[2]) ** 2) <= 1.0


def _anatomy(site: str, x: np.ndarray, y: np.ndarray, z: np.ndarray, z_half: float
             ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """HU and truth masks at patient points (x, y, z in mm, body centred at 0)."""
    hu = np.full(x.shape, AIR, dtype=np.float32)
    # Couch: a carbon-fibre shell over a foam core, 4 mm below the back.
    couch_top = 118.0 if site != "head" else 100.0
    shell = (y >= couch_top) & (y < couch_top + 4) & (np.abs(x) < 260)
    foam = (y >= couch_top + 4) & (y < couch_top + 40) & (np.abs(x) < 250)
    base = (y >= couch_top + 40) & (y < couch_top + 44) & (np.abs(x) < 260)
    hu[foam] = COUCH_FOAM
    hu[shell | base] = COUCH_SHELL
    truth: dict[str, np.ndarray] = {}
    if site == "head":
        body = _ellipsoid(x, y, z, (0, 0, 0), (80, 95, z_half * 1.6))
        skull = body & ~_ellipsoid(x, y, z, (0, 0, 0), (72, 87, z_half * 1.5))
        hu[body] = 35.0
        hu[skull] = BONE + 300
        truth.update(External=body, Bones=skull)
        return hu, truth
    a, b = (170.0, 112.0) if site == "thorax" else (180.0, 115.0)
    body = _ellipse(x, y, 0, 0, a, b)
    hu[body] = FAT
    hu[_ellipse(x, y, 0, 0, a - 12, b - 12)] = SOFT
    vertebra = _ellipse(x, y, 0, 62, 20, 16)
    canal = _ellipse(x, y, 0, 88, 8, 7)
    posterior = _ellipse(x, y, 0, 88, 17, 15) & ~canal
    bones = vertebra | posterior
    if site == "thorax":
        ring = _ellipse(x, y, 0, 0, a - 16, b - 16) & ~_ellipse(x, y, 0, 0, a - 24, b - 24)
        ribs = ring & (y > -60) & (np.cos(z / 12.0 * np.pi) > 0.3) & (np.abs(x) > 30)
        bones = bones | ribs
        lung_r = _ellipsoid(x, y, z, (-72, 5, 0), (58, 68, z_half * 0.8))
        lung_l = _ellipsoid(x, y, z, (72, 5, 0), (58, 68, z_half * 0.8))
        heart = _ellipsoid(x, y, z, (12, -20, -z_half * 0.3), (45, 40, z_half * 0.4))
        trachea = _ellipse(x, y, 0, -35, 9, 9) & (z > z_half * 0.05)
        # Main bronchi run from the carina into each lung, as air tubes.
        t = np.clip(-z / (z_half * 0.35), 0, 1)
        bronchi = (z <= z_half * 0.05) & (z > -z_half * 0.35) & (
            (((x - 50 * t) ** 2 + (y + 35 - 20 * t) ** 2) <= 36)
            | (((x + 50 * t) ** 2 + (y + 35 - 20 * t) ** 2) <= 36))
        airways = (trachea | bronchi) & body
        lung_r &= ~airways
        lung_l &= ~airways & ~heart
        lung_r &= ~heart
        hu[lung_r | lung_l] = LUNG
        hu[heart] = 45.0
        hu[airways] = AIR
        truth.update(Lung_L=lung_l, Lung_R=lung_r, Lungs=lung_l | lung_r, Heart=heart,
                     Trachea=airways)
    else:
        bladder = _ellipsoid(x, y, z, (0, -40, 0), (40, 30, z_half * 0.5))
        wings = (_ellipse(x, y, -95, 20, 30, 55) | _ellipse(x, y, 95, 20, 30, 55)) & \
            ~(_ellipse(x, y, -95, 20, 22, 47) | _ellipse(x, y, 95, 20, 22, 47))
        bones = bones | wings
        hu[bladder] = 10.0
        truth.update(Bladder=bladder)
    hu[bones] = BONE
    hu[canal] = 20.0
    truth.update(External=body, Bones=bones & body, SpinalCanal=canal)
    return hu, truth


def make_phantom(*, slices: int = 96, rows: int = 512, columns: int = 512,
                 pixel_spacing: tuple[float, float] = (0.9765625, 0.9765625),
                 slice_thickness: float = 3.0, patient_position: str = "HFS",
                 site: str = "thorax", slice_offsets: Sequence[float] | None = None,
                 gantry_tilt_deg: float = 0.0, seed: int = 0,
                 patient_id: str = "PHANTOM001", series_description: str | None = None
                 ) -> Phantom:
    """Build the phantom in memory; see the module docstring for conventions.

    ``slice_offsets`` (mm along the slice normal) overrides the uniform
    spacing; ``gantry_tilt_deg`` shears the stack so positions no longer
    advance along the normal (what a tilted acquisition looks like).
    """
    if patient_position not in ORIENTATIONS:
        raise ValueError(f"patient_position must be one of {sorted(ORIENTATIONS)}")
    if site not in SITES:
        raise ValueError(f"site must be one of {SITES}")
    rng = np.random.default_rng(seed)
    row_dir, col_dir = (np.array(v, dtype=float) for v in ORIENTATIONS[patient_position])
    normal = np.cross(row_dir, col_dir)
    offsets = (np.asarray(slice_offsets, dtype=float) if slice_offsets is not None
               else (np.arange(slices) - (slices - 1) / 2) * slice_thickness)
    z_half = max(float(np.abs(offsets).max()), 1.0)
    width = (columns - 1) * pixel_spacing[1]
    height = (rows - 1) * pixel_spacing[0]
    # Centre the grid on the patient axis: first pixel at -half extent along each direction.
    first = -(width / 2) * row_dir - (height / 2) * col_dir
    shear = np.tan(np.radians(gantry_tilt_deg)) * col_dir
    cols_mm = np.arange(columns) * pixel_spacing[1]
    rows_mm = np.arange(rows) * pixel_spacing[0]
    in_plane = (first[None, None, :] + cols_mm[None, :, None] * row_dir[None, None, :]
                + rows_mm[:, None, None] * col_dir[None, None, :])
    study_uid, series_uid, frame_uid = (generate_uid() for _ in range(3))
    when = _dt.datetime(2026, 1, 15, 9, 30, 0)
    datasets, truths = [], []
    for k, offset in enumerate(sorted(offsets)):
        origin = offset * normal + offset * shear
        points = in_plane + origin[None, None, :]
        hu, truth = _anatomy(site, points[..., 0], points[..., 1], points[..., 2], z_half)
        inside = hu > AIR
        hu = hu + rng.normal(0.0, 12.0, hu.shape).astype(np.float32) * inside
        stored = np.clip(np.round(hu + 1024), 0, 4095).astype(np.uint16)
        datasets.append(_slice_dataset(
            stored, k, first + origin, row_dir, col_dir, pixel_spacing, slice_thickness,
            patient_position, study_uid, series_uid, frame_uid, when, patient_id,
            series_description or f"Phantom {site} {patient_position}", gantry_tilt_deg))
        truths.append(truth)
    names = sorted(set().union(*truths))
    truth_volume = {name: np.stack([t.get(name, np.zeros((rows, columns), bool))
                                    for t in truths]) for name in names}
    return Phantom(datasets, truth_volume, volume_from_datasets(datasets))


def _ds(value: float) -> str:
    return f"{value:.6f}".rstrip("0").rstrip(".") or "0"


def _slice_dataset(pixels: np.ndarray, index: int, ipp: np.ndarray, row_dir: np.ndarray,
                   col_dir: np.ndarray, spacing: tuple[float, float], thickness: float,
                   position: str, study_uid: str, series_uid: str, frame_uid: str,
                   when: _dt.datetime, patient_id: str, description: str,
                   tilt: float) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
    ds.AccessionNumber = "PH0001"
    ds.Modality = "CT"
    ds.Manufacturer = "oncoseg-node phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT simulation (synthetic phantom)"
    ds.SeriesDescription = description
    ds.ManufacturerModelName = "phantom"
    ds.SoftwareVersions = __version__
    ds.PatientName = "Phantom^Synthetic"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = _ds(thickness)
    ds.KVP = "120"
    ds.GantryDetectorTilt = _ds(tilt)
    ds.PatientPosition = position
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [_ds(v) for v in ipp]
    ds.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
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


def write_phantom(out_dir: Path, **kwargs: object) -> Phantom:
    """Write the phantom as ``CT000001.dcm``... in ``out_dir`` and return it."""
    phantom = make_phantom(**kwargs)  # type: ignore[arg-type]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for ds in phantom.datasets:
        pydicom.dcmwrite(out_dir / f"CT{int(ds.InstanceNumber):06d}.dcm", ds,
                         enforce_file_format=True)
    return phantom
