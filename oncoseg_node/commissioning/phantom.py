"""A synthetic CT series with known organs, for tests, demos and benchmarks.

The anatomy is defined analytically in DICOM patient coordinates (LPS: +x
toward the patient's left, +y posterior, +z toward the head) and sampled at
every voxel centre of the requested image grid; ``truth`` masks are exactly
those samples. Patient position (HFS, HFP, FFS, FFP), anisotropic pixels,
non-uniform slice spacing and gantry tilt therefore change only the grid.

The anatomy is scaled along z to the scanned length, so every organ appears
in a scan of any length. It is built to be as hard as a patient, not to
flatter an engine: bones are cortical shells around trabecular marrow
(100-300 HU with texture), vertebrae have pedicles over part of their height
so the canal is ringed by bone on a minority of slices, discs sit between
them, ribs are blended with soft tissue over 3 mm slices, iodine fills the
aorta and bowel loops as densely as bone, arms lie beside the body (or are
raised), a curved couch carries a foam mattress, and there is metal (a port,
a hip prosthesis). Lungs carry a gravity gradient, texture and vessels;
trachea and main bronchi are air tubes that enter the lungs; the lungs touch
at an anterior junction; the pelvis has rectal gas and the head a
thermoplastic mask and a headrest. ``Variant`` (sizes, densities, noise,
devices) changes between named patients so that an engine's thresholds can
be checked on more than one. Image edges get about a pixel of blur and all
voxels Gaussian noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from oncoseg_node.commissioning.phantom_dicom import slice_dataset
from oncoseg_node.commissioning.phantom_grid import VARIANTS, Frame, Slice, Variant
from oncoseg_node.commissioning.phantom_sites import SITES
from oncoseg_node.contouring.volume import Volume, volume_from_datasets

__all__ = ["ORIENTATIONS", "SITES", "VARIANTS", "Phantom", "Variant", "make_phantom",
           "write_phantom"]

# ImageOrientationPatient (row direction, column direction) per patient position.
ORIENTATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "HFS": ((1, 0, 0), (0, 1, 0)),
    "HFP": ((-1, 0, 0), (0, -1, 0)),
    "FFS": ((-1, 0, 0), (0, 1, 0)),
    "FFP": ((1, 0, 0), (0, -1, 0)),
}


@dataclass(frozen=True, eq=False)
class Phantom:
    """CT slices sorted along the slice normal, truth masks on the same (z, y, x) grid."""

    datasets: list[Dataset]
    truth: dict[str, np.ndarray]
    volume: Volume


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


def _texture(rng: np.random.Generator, shape: tuple[int, ...], amplitude: float) -> np.ndarray:
    """Trabecular texture: noise correlated over a few pixels, ``amplitude`` HU s.d."""
    field = _blur(_blur(rng.standard_normal(shape, dtype=np.float32)))
    return field * np.float32(amplitude / max(float(field.std()), 1e-6))


def make_phantom(*, slices: int = 96, rows: int = 512, columns: int = 512,
                 pixel_spacing: tuple[float, float] = (0.9765625, 0.9765625),
                 slice_thickness: float = 3.0, patient_position: str = "HFS",
                 site: str = "thorax", slice_offsets: Sequence[float] | None = None,
                 gantry_tilt_deg: float = 0.0, seed: int = 0,
                 patient_id: str = "PHANTOM001", series_description: str | None = None,
                 variant: Variant | str = "standard") -> Phantom:
    """Build the phantom in memory; see the module docstring for conventions.

    ``pixel_spacing`` is DICOM PixelSpacing (between rows, between columns).
    ``slice_offsets`` (mm along the table axis) overrides the uniform spacing.
    ``gantry_tilt_deg`` rotates the image plane about the patient's x axis
    while the table still advances along z, so positions are sheared
    relative to the slice normal, as on a tilted scanner. The same arguments
    give the same pixels and UIDs. ``variant`` (a :class:`Variant` or a name
    in ``VARIANTS``) sets the patient's size, bone densities, contrast, arms,
    couch, mattress, metal and noise.
    """
    v = VARIANTS[variant] if isinstance(variant, str) else variant
    if patient_position not in ORIENTATIONS:
        raise ValueError(f"patient_position must be one of {sorted(ORIENTATIONS)}")
    if site not in SITES:
        raise ValueError(f"site must be one of {tuple(SITES)}")
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
    frame = Frame(zc, zh, 1.0 if patient_position.endswith("S") else -1.0,
                  _vessels(np.random.default_rng([seed, 1]), zc, zh), v)
    noise = np.random.default_rng([seed, 2])
    trabeculae = np.random.default_rng([seed, 3])
    entropy = [str(v) for v in (seed, site, patient_position, rows, columns, pixel_spacing,
                                slice_thickness, list(offsets), gantry_tilt_deg, patient_id,
                                series_description, v)]
    study_uid, series_uid, frame_uid = (generate_uid(entropy_srcs=[*entropy, kind])
                                        for kind in ("study", "series", "frame"))
    description = series_description or f"Phantom {site} {patient_position}"
    datasets, truths = [], []
    for k, offset in enumerate(offsets):
        ipp = first + offset * table
        grid = Slice(ipp[0] + np.arange(columns) * dc * row_dir[0],
                      ipp[1] + np.arange(rows) * dr * col_dir[1],
                      ipp[2] + np.arange(rows) * dr * col_dir[2])
        hu, truth, marrow = SITES[site](grid, frame, slice_thickness)
        hu += marrow * _texture(trabeculae, hu.shape, v.texture_hu)
        hu = _blur(hu) + noise.standard_normal(hu.shape, dtype=np.float32) * v.noise_sd
        stored = np.clip(np.rint(hu + 1024.0), 0, 4095).astype(np.uint16)
        ds = slice_dataset(stored, k, ipp, row_dir, col_dir, (dr, dc), slice_thickness,
                            patient_position, site, description, gantry_tilt_deg, patient_id)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[*entropy, "instance", str(k)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        datasets.append(ds)
        truths.append(truth)
    truth_volume = {name: np.stack([t[name] for t in truths]) for name in truths[0]}
    return Phantom(datasets, truth_volume, volume_from_datasets(datasets))


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
