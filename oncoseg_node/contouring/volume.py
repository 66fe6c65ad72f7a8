"""A CT series as one volume: pixels ``(z, y, x)`` in HU plus per-slice geometry.

Coordinates are DICOM patient coordinates (LPS: +x toward the patient's left,
+y posterior, +z head). Slices are sorted along the slice normal
(row direction x column direction), and each keeps its own
ImagePositionPatient, so non-uniform slice spacing and gantry tilt are
represented exactly rather than through one series matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset

from oncoseg_node.dicom.rescale import rescale
from oncoseg_node.errors import PixelDecodeError, SeriesLoadError


@dataclass(frozen=True, eq=False)
class Volume:
    """A sorted CT series.

    ``hu`` is int16 ``(z, y, x)`` in HU, rounded to the nearest integer (CT
    stores 12 to 16 bit integers with slope 1 and an integer intercept, so
    this is exact for CT; half the memory of float32): z indexes slices in
    ascending order along the slice normal, y indexes rows and x columns.
    Arithmetic on it casts first (``hu.astype(np.float32)``), never in place.
    ``hu_clipped`` counts voxels whose rescaled value lay outside int16 and
    were clipped to its range (-32768..32767 HU); it is 0 for real CT. ``positions[k]`` is the
    ImagePositionPatient (centre of the first transmitted pixel) of slice k.
    ``row_direction`` is the patient-space direction of increasing column
    index (x); ``col_direction`` that of increasing row index (y); both come
    from ImageOrientationPatient. ``pixel_spacing`` is DICOM PixelSpacing:
    (spacing between rows, spacing between columns) in mm.
    """

    hu: np.ndarray
    positions: np.ndarray
    row_direction: np.ndarray
    col_direction: np.ndarray
    pixel_spacing: tuple[float, float]
    sop_instance_uids: tuple[str, ...]
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    patient_position: str
    header: Dataset = field(repr=False)
    hu_clipped: int = 0

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = self.hu.shape
        return int(z), int(y), int(x)

    @property
    def hu_note(self) -> str:
        """What an operator should know about the HU values; empty for real CT."""
        if not self.hu_clipped:
            return ""
        return (f"{self.hu_clipped} voxels rescale to HU outside {HU_MIN}..{HU_MAX} "
                "and were clipped to that range")

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal (row direction x column direction)."""
        n = np.cross(self.row_direction, self.col_direction)
        return n / np.linalg.norm(n)

    @property
    def slice_offsets(self) -> np.ndarray:
        """Position of each slice along the normal, in mm (ascending)."""
        return self.positions @ self.normal

    @property
    def voxel_volume_mm3(self) -> np.ndarray:
        """Per-slice voxel volume in mm^3, using each slice's local thickness."""
        offsets = self.slice_offsets
        if len(offsets) == 1:
            thickness = np.array([float(self.header.get("SliceThickness", 1.0) or 1.0)])
        else:
            gaps = np.diff(offsets)
            thickness = np.empty(len(offsets))
            thickness[0] = gaps[0]
            thickness[-1] = gaps[-1]
            thickness[1:-1] = (gaps[:-1] + gaps[1:]) / 2.0
        return thickness * self.pixel_spacing[0] * self.pixel_spacing[1]

    def mask_volume_cc(self, mask: np.ndarray) -> float:
        """Volume of a ``(z, y, x)`` boolean mask in cubic centimetres."""
        per_slice = mask.reshape(mask.shape[0], -1).sum(axis=1)
        return float((per_slice * self.voxel_volume_mm3).sum() / 1000.0)

    def index_to_patient(self, z: int | np.ndarray, rows: np.ndarray,
                         cols: np.ndarray) -> np.ndarray:
        """Map (fractional) pixel indices of slice ``z`` to LPS points, shape (n, 3).

        ``z`` is one slice index or one per point; each point is placed with
        its own slice's position. Index (row 0, column 0) is the centre of
        the first pixel; a pixel's edge lies at index -0.5.
        """
        rows = np.asarray(rows, dtype=np.float64)
        cols = np.asarray(cols, dtype=np.float64)
        return (
            np.atleast_2d(self.positions[z])
            + cols[:, None] * self.pixel_spacing[1] * self.row_direction[None, :]
            + rows[:, None] * self.pixel_spacing[0] * self.col_direction[None, :]
        )

    def patient_x_of_columns(self, z: int = 0) -> np.ndarray:
        """Patient LPS x (mm, + = patient's left) of each column centre on row 0."""
        cols = np.arange(self.hu.shape[2])
        return self.index_to_patient(z, np.zeros_like(cols), cols)[:, 0]


def _header_without_pixels(ds: Dataset) -> Dataset:
    header = Dataset()
    for elem in ds:
        if elem.tag.group == 0x7FE0:
            continue
        header.add(elem)
    header.file_meta = getattr(ds, "file_meta", FileMetaDataset())
    return header


# Type 1 attributes (present and not empty) of the CT Image IOD that the
# volume and the structure set we derive from it depend on. An anonymiser that
# blanks a UID produces a structure set that references nothing.
CT_TYPE1 = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
            "Modality", "FrameOfReferenceUID", "ImagePositionPatient",
            "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")


def empty_type1(datasets: Sequence[Dataset]) -> dict[str, int]:
    """Type 1 attributes missing or empty in the instances: keyword -> how many instances."""
    found: dict[str, int] = {}
    for ds in datasets:
        for keyword in CT_TYPE1:
            value = ds.get(keyword)
            if value is None or value == "" or (hasattr(value, "__len__") and len(value) == 0):
                found[keyword] = found.get(keyword, 0) + 1
    return found


def check_type1(datasets: Sequence[Dataset]) -> None:
    """Raise :class:`SeriesLoadError` naming every empty Type 1 attribute."""
    found = empty_type1(datasets)
    if found:
        named = ", ".join(f"{k} (in {n} of {len(datasets)})" for k, n in found.items())
        raise SeriesLoadError(f"empty Type 1 attribute(s): {named}")


def read_ct_slices(paths: Sequence[Path], *, pixels: bool = True) -> list[Dataset]:
    """Read CT image files; raises :class:`SeriesLoadError` naming a bad file.

    ``pixels=False`` reads each header only (up to PixelData), for deciding
    on a series before any pixel is decoded; the dataset then remembers its
    file in ``filename`` for :func:`volume_from_files`.
    """
    datasets: list[Dataset] = []
    for path in paths:
        try:
            datasets.append(pydicom.dcmread(path, stop_before_pixels=not pixels))
        except Exception as exc:  # pydicom raises several unrelated types
            raise SeriesLoadError(f"{path}: not a readable DICOM file ({exc})") from exc
    return datasets


def decode_pixels(ds: Dataset, *, as_stored: bool = False) -> np.ndarray:
    """One slice's stored values as float32 (rows, columns), whatever its transfer syntax.

    ``as_stored`` returns them in their stored integer type, uncopied.

    Compressed syntaxes are decoded by pydicom's handlers and the pylibjpeg
    plugins (JPEG, JPEG-LS, JPEG 2000, RLE); deflated ones were inflated
    when the file was read. Raises :class:`PixelDecodeError` naming the
    instance and its transfer syntax.
    """
    syntax = ds.file_meta.get("TransferSyntaxUID", "") if hasattr(ds, "file_meta") else ""
    try:
        arr = ds.pixel_array
    except Exception as exc:  # the codecs raise many unrelated types
        name = getattr(syntax, "name", str(syntax)) or "unknown transfer syntax"
        raise PixelDecodeError(
            f"instance {ds.get('SOPInstanceUID', '?')}: pixel data cannot be decoded "
            f"({name}): {type(exc).__name__}: {exc}") from exc
    if arr.ndim != 2:
        raise PixelDecodeError(
            f"instance {ds.get('SOPInstanceUID', '?')}: decoded to shape {arr.shape}, "
            "not one slice")
    return arr if as_stored else arr.astype(np.float32)


HU_MIN, HU_MAX = -32768, 32767  # int16, the type of Volume.hu


def _rescale_into(out: np.ndarray, ds: Dataset) -> int:
    """One slice of ``ds`` decoded and rescaled to int16 HU in ``out``; voxels clipped.

    Slope 1 with an integer intercept on 16-bit stored values (every CT
    scanner) is added in 16-bit arithmetic with no float copy: the sum is
    exact modulo 2**16, so once the range is checked it is the HU itself.
    Anything else goes through one float64 slice, rounded and clipped.
    """
    stored = decode_pixels(ds, as_stored=True)
    if stored.shape != out.shape:
        raise SeriesLoadError(f"slice {ds.get('SOPInstanceUID', '?')}: pixel data is "
                              f"{stored.shape}, Rows x Columns say {out.shape}")
    found = rescale(ds)
    if isinstance(found, str):
        raise SeriesLoadError(f"slice {ds.get('SOPInstanceUID', '?')}: {found}")
    slope, intercept = found
    if (slope == 1.0 and intercept.is_integer() and stored.dtype.itemsize == 2
            and stored.dtype.kind in "iu" and stored.size):
        shift = int(intercept)
        if int(stored.min()) + shift >= HU_MIN and int(stored.max()) + shift <= HU_MAX:
            wrapped = np.array(shift % 65536, dtype=np.uint16).view(np.int16)
            np.add(stored.view(np.int16), wrapped, out=out)
            return 0
    scaled = stored * slope  # float64: exact for any 32-bit stored value
    scaled += intercept
    np.rint(scaled, out=scaled)
    clipped = int(np.count_nonzero((scaled < HU_MIN) | (scaled > HU_MAX)))
    np.clip(scaled, HU_MIN, HU_MAX, out=scaled)
    np.copyto(out, scaled, casting="unsafe")  # integral and in range by now
    return clipped


def volume_from_files(headers: Sequence[Dataset]) -> Volume:
    """A :class:`Volume` from header-only datasets (``read_ct_slices(pixels=False)``).

    Each file is read again for its pixels, one at a time, and decoded into
    the preallocated volume, so peak memory is the volume plus one slice.
    """

    def with_pixels(header: Dataset) -> Dataset:
        path = getattr(header, "filename", None)
        if not isinstance(path, str | Path):
            raise SeriesLoadError("a header-only dataset does not name its file")
        try:
            return pydicom.dcmread(path)
        except Exception as exc:  # the file changed or vanished since its header was read
            raise SeriesLoadError(f"{path}: not a readable DICOM file ({exc})") from exc

    return volume_from_datasets(headers, decode_from=with_pixels)


def volume_from_datasets(datasets: Sequence[Dataset], *,
                         decode_from: Callable[[Dataset], Dataset] | None = None) -> Volume:
    """Build a :class:`Volume` from the instances of one CT series.

    Geometry consistency is the gate's job (``geometry.check_series``); this
    function only requires what it needs to stack the pixels.
    """
    if not datasets:
        raise SeriesLoadError("no instances in series")
    try:
        iop = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
        spacing = tuple(float(v) for v in datasets[0].PixelSpacing)
    except AttributeError as exc:
        raise SeriesLoadError(f"series lacks image plane attributes: {exc}") from exc
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    keyed = []
    for ds in datasets:
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        keyed.append((float(ipp @ normal), ipp, ds))
    keyed.sort(key=lambda item: item[0])
    shapes = {(int(ds.Rows), int(ds.Columns)) for _, _, ds in keyed}
    if len(shapes) != 1:
        raise SeriesLoadError(f"slices have different sizes: {sorted(shapes)}")
    # One preallocated HU volume, each slice decoded straight into its place:
    # the load holds one copy of the series, never a list of slices beside a stack.
    hu = np.empty((len(keyed), *shapes.pop()), dtype=np.int16)
    clipped = 0
    for k, (_, _, ds) in enumerate(keyed):
        clipped += _rescale_into(hu[k], ds if decode_from is None else decode_from(ds))
    first = keyed[0][2]
    return Volume(
        hu=hu,
        positions=np.stack([ipp for _, ipp, _ in keyed]),
        row_direction=row_dir,
        col_direction=col_dir,
        pixel_spacing=(spacing[0], spacing[1]),
        sop_instance_uids=tuple(str(ds.SOPInstanceUID) for _, _, ds in keyed),
        sop_class_uid=str(first.SOPClassUID),
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=str(first.SeriesInstanceUID),
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
        patient_position=str(first.get("PatientPosition", "") or ""),
        header=_header_without_pixels(first),
        hu_clipped=clipped,
    )


def load_series_dir(directory: Path) -> Volume:
    """Read every DICOM file in ``directory`` (not recursive) as one CT series."""
    paths = sorted(p for p in Path(directory).iterdir() if p.is_file())
    if not paths:
        raise SeriesLoadError(f"{directory}: no files")
    return volume_from_files(read_ct_slices(paths, pixels=False))
