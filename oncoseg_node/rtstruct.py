"""Masks plus their CT series -> an RT Structure Set marked as an automatic draft.

Every contour point is mapped with its own slice's ImagePositionPatient,
ImageOrientationPatient and PixelSpacing (no series-wide matrix), so
non-uniform spacing and any patient position stay exact. Contours follow
pixel edges (see :mod:`contours`); holes are written the way the
destination's profile says (keyhole cut or separate inner contour).
Coordinates are DICOM patient coordinates in mm (LPS), written as DS values
of at most 16 characters. The object says what it is: ApprovalStatus
UNAPPROVED, a label and description marking automatic contours for review.
"""

from __future__ import annotations

import datetime as _dt
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from . import __version__
from .contours import corners_to_index, keyhole, trace_regions
from .dicom.filemeta import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from .dicom.spool import write_durably
from .errors import RTStructError
from .profiles import DestinationProfile
from .volume import Volume

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
# RT Referenced Study Sequence items reference the study by this SOP class
# (Study Component Management), as planning systems expect.
STUDY_COMPONENT_MANAGEMENT = "1.2.840.10008.3.1.2.3.2"
CONTOUR_DATA = Tag(0x3006, 0x0050)
MANUFACTURER = "oncoseg-node"
STRUCTURE_SET_LABEL = "AUTO DRAFT"
SERIES_DESCRIPTION = "AUTOMATIC CONTOURS - DRAFT FOR REVIEW"
# Copied from the CT so that CT and structure set describe one patient and study.
PATIENT_STUDY_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "PatientAge", "OtherPatientIDsSequence", "StudyInstanceUID", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription",
)
TYPE2_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                       "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                       "AccessionNumber")


@dataclass(frozen=True, eq=False)
class RoiMask:
    """One structure to write: ``mask`` is ``(z, y, x)`` on the volume's grid."""

    name: str
    color: tuple[int, int, int]
    interpreted_type: str
    mask: np.ndarray
    engine: str | None = None  # which engine drew it, for its ROIGenerationDescription


@dataclass(frozen=True)
class GenerationInfo:
    """What made the contours: engine, model identity, protocol and its version.

    ``models`` maps engine name to model identity (weights hash, adapter) when
    several engines contributed; ``model`` is used for any engine not in it.
    """

    engine: str
    model: str
    protocol_name: str
    protocol_version: str
    models: Mapping[str, str] = field(default_factory=dict)

    def describe(self, engine: str | None = None, limit: int = 64) -> str:
        """ROIGenerationDescription (LO, 64 characters): the protocol version always fits."""
        engine = engine or self.engine
        suffix = f"; protocol {self.protocol_name}@{self.protocol_version}"
        head = f"{engine}: {self.models.get(engine, self.model)}"
        return head[:max(limit - len(suffix), 8)] + suffix[:limit]

    def full(self) -> str:
        models = "; ".join(f"{k}: {v}" for k, v in sorted(self.models.items())) or \
            f"{self.engine}: {self.model}"
        return (f"oncoseg-node {__version__}; protocol {self.protocol_name} version "
                f"{self.protocol_version}; {models}")


def encode_ds(values: np.ndarray) -> bytes:
    """Backslash-separated DS text, 0.001 mm resolution, built without per-value Python.

    Each value is laid out in a fixed-width row (sign, six integer digits,
    point, three decimals), then the padding spaces are squeezed out: the
    result reads like ``-123.456\\7.000``, every value at most 11 characters.
    """
    milli = np.round(np.asarray(values, dtype=np.float64).ravel() * 1000.0).astype(np.int64)
    magnitude = np.abs(milli)
    whole, frac = magnitude // 1000, magnitude % 1000
    if whole.size and int(whole.max()) >= 10**6:
        raise RTStructError("a contour coordinate exceeds 999999 mm")
    rows = np.full((milli.size, 12), ord(" "), dtype=np.uint8)
    digits = np.ones(milli.size, dtype=np.int64)
    for power in range(1, 6):
        digits += whole >= 10**power
    for j in range(6):
        shown = j < digits
        rows[shown, 6 - j] = ord("0") + (whole[shown] // 10**j) % 10
    negative = milli < 0
    rows[np.flatnonzero(negative), 6 - digits[negative]] = ord("-")
    rows[:, 7] = ord(".")
    rows[:, 8] = ord("0") + frac // 100
    rows[:, 9] = ord("0") + (frac // 10) % 10
    rows[:, 10] = ord("0") + frac % 10
    rows[:, 11] = ord("\\")
    flat = rows.ravel()[:-1]
    return flat[flat != ord(" ")].tobytes()


def _contour_data(points: np.ndarray) -> RawDataElement:
    """ContourData encoded directly: thousands of DS values without per-value objects."""
    text = encode_ds(points)
    if len(text) % 2:
        text += b" "
    return RawDataElement(CONTOUR_DATA, "DS", len(text), text, 0, False, True)


def _now() -> tuple[str, str]:
    now = _dt.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def slice_contours(volume: Volume, z: int, mask2d: np.ndarray, hole_style: str,
                   min_pixels: int) -> list[np.ndarray]:
    """Closed contours of one slice as (n, 3) LPS points."""
    out = []
    for region in trace_regions(mask2d, min_pixels=min_pixels):
        loops = ([keyhole(region.outer, region.holes)] if hole_style == "keyhole"
                 else [region.outer, *region.holes])
        for loop in loops:
            if len(loop) < 3:
                continue
            rows, cols = corners_to_index(loop)
            out.append(volume.index_to_patient(z, rows, cols))
    return out


def build_rtstruct(volume: Volume, rois: Sequence[RoiMask], info: GenerationInfo,
                   profile: DestinationProfile, *, sop_instance_uid: str | None = None,
                   series_instance_uid: str | None = None,
                   min_island_mm2: float = 0.0) -> Dataset:
    """The RT Structure Set for ``rois`` over ``volume`` (not yet written)."""
    names = [r.name for r in rois]
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise RTStructError(f"duplicate ROI names: {duplicates}")
    for name in names:
        if not name or len(name) > profile.max_roi_name_length:
            raise RTStructError(f"ROI name {name!r} breaks the {profile.name} limit of "
                                f"{profile.max_roi_name_length} characters")
    header = volume.header
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = sop_instance_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    date, time = _now()
    ds.SpecificCharacterSet = header.get("SpecificCharacterSet", profile.charset)
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in header:
            ds[keyword] = header[keyword]
    for keyword in TYPE2_PATIENT_STUDY:
        if keyword not in ds:
            setattr(ds, keyword, "")
    ds.FrameOfReferenceUID = volume.frame_of_reference_uid
    ds.PositionReferenceIndicator = header.get("PositionReferenceIndicator", "")
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = series_instance_uid or generate_uid()
    ds.SeriesNumber = 901
    ds.SeriesDescription = SERIES_DESCRIPTION
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.OperatorsName = ""
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MANUFACTURER
    ds.SoftwareVersions = __version__
    ds.InstanceNumber = 1
    ds.StructureSetLabel = STRUCTURE_SET_LABEL
    ds.StructureSetName = "AUTO DRAFT FOR REVIEW"
    ds.StructureSetDescription = ("Automatic contours, not approved: review and edit every "
                                  "structure before clinical use. " + info.full())[:1024]
    ds.StructureSetDate, ds.StructureSetTime = date, time
    ds.ApprovalStatus = "UNAPPROVED"

    images = [_image_ref(volume, uid) for uid in volume.sop_instance_uids]
    series_ref = Dataset()
    series_ref.SeriesInstanceUID = volume.series_instance_uid
    series_ref.ContourImageSequence = DicomSequence(images)
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = STUDY_COMPONENT_MANAGEMENT
    study_ref.ReferencedSOPInstanceUID = volume.study_instance_uid
    study_ref.RTReferencedSeriesSequence = DicomSequence([series_ref])
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = volume.frame_of_reference_uid
    frame_ref.RTReferencedStudySequence = DicomSequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame_ref])

    pixel_mm2 = volume.pixel_spacing[0] * volume.pixel_spacing[1]
    min_pixels = max(1, int(np.ceil(min_island_mm2 / pixel_mm2))) if min_island_mm2 else 1
    structure_rois, contour_rois, observations = [], [], []
    for number, roi in enumerate(rois, start=1):
        item = Dataset()
        item.ROINumber = number
        item.ReferencedFrameOfReferenceUID = volume.frame_of_reference_uid
        item.ROIName = roi.name
        item.ROIGenerationAlgorithm = "AUTOMATIC"
        item.ROIGenerationDescription = info.describe(roi.engine)[:64]
        structure_rois.append(item)

        contours = []
        for z in np.flatnonzero(roi.mask.any(axis=(1, 2))):
            for points in slice_contours(volume, int(z), roi.mask[z], profile.hole_style,
                                         min_pixels):
                contour = Dataset()
                contour.ContourImageSequence = DicomSequence([_image_ref(
                    volume, volume.sop_instance_uids[int(z)])])
                contour.ContourGeometricType = "CLOSED_PLANAR"
                contour.NumberOfContourPoints = len(points)
                contour.ContourNumber = len(contours) + 1
                contour[CONTOUR_DATA] = _contour_data(points)
                # Declared as already Explicit VR Little Endian, so the writer
                # copies the encoded ContourData instead of decoding it.
                contour.set_original_encoding(False, True, contour._character_set)
                contours.append(contour)
        roi_contour = Dataset()
        roi_contour.ROIDisplayColor = list(roi.color)
        roi_contour.ReferencedROINumber = number
        roi_contour.ContourSequence = DicomSequence(contours)
        contour_rois.append(roi_contour)

        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.ROIObservationLabel = roi.name[:16]
        observation.RTROIInterpretedType = roi.interpreted_type
        observation.ROIInterpreter = ""
        observations.append(observation)
    ds.StructureSetROISequence = DicomSequence(structure_rois)
    ds.ROIContourSequence = DicomSequence(contour_rois)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    return ds


def _image_ref(volume: Volume, uid: str) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = volume.sop_class_uid
    ref.ReferencedSOPInstanceUID = uid
    return ref


def check_rtstruct(ds: Dataset, volume: Volume, profile: DestinationProfile) -> list[str]:
    """Problems that would make a planning system refuse or misplace the set."""
    problems = []
    if ds.get("SOPClassUID") != RT_STRUCTURE_SET_STORAGE:
        problems.append("SOPClassUID is not RT Structure Set Storage")
    if ds.get("ApprovalStatus") != "UNAPPROVED":
        problems.append("ApprovalStatus is not UNAPPROVED")
    if ds.file_meta.get("TransferSyntaxUID") != ExplicitVRLittleEndian:
        problems.append("transfer syntax is not Explicit VR Little Endian")
    for keyword in ("StudyInstanceUID", "PatientID"):
        if str(ds.get(keyword, "")) != str(volume.header.get(keyword, "")):
            problems.append(f"{keyword} differs from the CT")
    try:
        frame = ds.ReferencedFrameOfReferenceSequence[0]
        series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    except (AttributeError, IndexError):
        return [*problems, "ReferencedFrameOfReferenceSequence incomplete"]
    if frame.FrameOfReferenceUID != volume.frame_of_reference_uid:
        problems.append("FrameOfReferenceUID differs from the CT")
    if series.SeriesInstanceUID != volume.series_instance_uid:
        problems.append("referenced SeriesInstanceUID differs from the CT")
    images = {item.ReferencedSOPInstanceUID for item in series.ContourImageSequence}
    if images != set(volume.sop_instance_uids):
        problems.append("ContourImageSequence does not list every CT image")
    names = [item.ROIName for item in ds.get("StructureSetROISequence", [])]
    for name in names:
        if len(name) > profile.max_roi_name_length:
            problems.append(f"ROI name {name!r} longer than {profile.max_roi_name_length}")
    for roi in ds.get("ROIContourSequence", []):
        for contour in roi.get("ContourSequence", []):
            raw = contour.get_item(CONTOUR_DATA)
            values = (raw.value.split(b"\\") if isinstance(raw, RawDataElement)
                      else [str(v).encode() for v in contour.ContourData])
            if max(map(len, values)) > 16:
                problems.append(f"ROI {roi.ReferencedROINumber}: a DS value exceeds 16 characters")
                break
            if len(values) != 3 * int(contour.NumberOfContourPoints) or len(values) < 9:
                problems.append(f"ROI {roi.ReferencedROINumber}: contour with "
                                f"{len(values) // 3} points or a wrong point count")
                break
            ref = contour.ContourImageSequence[0].ReferencedSOPInstanceUID
            if ref not in images:
                problems.append(f"ROI {roi.ReferencedROINumber}: contour on an unknown image")
                break
    return problems


def save_verified(ds: Dataset, path: Path, volume: Volume, profile: DestinationProfile) -> None:
    """Write durably, read the file back and check it; raise RTStructError if it fails."""
    path = Path(path)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    write_durably(path, buffer.getvalue())
    back = pydicom.dcmread(path)
    problems = check_rtstruct(back, volume, profile)
    if problems:
        raise RTStructError("; ".join(problems))
