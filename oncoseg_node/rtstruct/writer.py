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
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import (
    ExplicitVRLittleEndian,
    RTStructureSetStorage,
    generate_uid,
)

from oncoseg_node import __version__
from oncoseg_node.contouring.volume import Volume
from oncoseg_node.dicom.filemeta import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from oncoseg_node.durable import write_durably
from oncoseg_node.errors import RTStructError
from oncoseg_node.rtstruct import encode as le
from oncoseg_node.rtstruct.contours import corners_to_index, keyhole, trace_volume
from oncoseg_node.rtstruct.profiles import DestinationProfile

# RT Referenced Study Sequence items reference the study by this SOP class
# (Study Component Management), as planning systems expect. It is retired, so
# neither pydicom nor pynetdicom names it.
STUDY_COMPONENT_MANAGEMENT = "1.2.840.10008.3.1.2.3.2"

CONTOUR_IMAGE_SEQUENCE = 0x30060016
CONTOUR_SEQUENCE = 0x30060040
CONTOUR_GEOMETRIC_TYPE = 0x30060042
NUMBER_OF_CONTOUR_POINTS = 0x30060046
CONTOUR_NUMBER = 0x30060048
CONTOUR_DATA = 0x30060050
REFERENCED_SOP_CLASS_UID = 0x00081150
REFERENCED_SOP_INSTANCE_UID = 0x00081155
MAX_DS_LENGTH = 16
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


def encode_ds_groups(values: np.ndarray, counts: Sequence[int] | np.ndarray) -> list[bytes]:
    """Backslash-separated DS text for consecutive groups of ``counts`` values each.

    0.001 mm resolution, built without per-value Python: each value is laid
    out in a fixed-width row (sign, six integer digits, point, three
    decimals, separator), the padding spaces are squeezed out and the text
    is cut at group ends. Values read like ``-123.456``, at most 11
    characters.
    """
    milli = np.round(np.asarray(values, dtype=np.float64).ravel() * 1000.0).astype(np.int64)
    magnitude = np.abs(milli)
    whole, frac = magnitude // 1000, magnitude % 1000
    if whole.size and int(whole.max()) >= 10**6:
        raise RTStructError("a contour coordinate exceeds 999999 mm")
    # Columns: 0 sign, 1-6 integer digits, 7 point, 8-10 decimals, 11 separator.
    digits = np.ones(milli.size, dtype=np.int64)
    for power in range(1, 6):
        digits += whole >= 10**power
    integer_columns = np.arange(1, 7)
    shown = (whole[:, None] // 10 ** (6 - integer_columns)) % 10
    rows = np.empty((milli.size, 12), dtype=np.uint8)
    rows[:, 0] = ord(" ")
    rows[:, 1:7] = np.where(integer_columns < 7 - digits[:, None], ord(" "), ord("0") + shown)
    rows[:, 7] = ord(".")
    rows[:, 8] = ord("0") + frac // 100
    rows[:, 9] = ord("0") + (frac // 10) % 10
    rows[:, 10] = ord("0") + frac % 10
    rows[:, 11] = ord("\\")
    negative = np.flatnonzero(milli < 0)
    rows[negative, 6 - digits[negative]] = ord("-")
    kept = rows != ord(" ")
    text = rows[kept].tobytes()
    value_ends = np.cumsum(kept.sum(axis=1))
    group_ends = value_ends[np.cumsum(counts) - 1].tolist()
    group_starts = [0, *group_ends[:-1]]
    # Each group drops its last separator.
    return [text[start:end - 1] for start, end in zip(group_starts, group_ends, strict=True)]


def encode_ds(values: np.ndarray) -> bytes:
    """Backslash-separated DS text of ``values`` (see :func:`encode_ds_groups`)."""
    values = np.asarray(values)
    return encode_ds_groups(values, [values.size])[0] if values.size else b""


def _now() -> tuple[str, str]:
    now = _dt.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def contour_image_references(volume: Volume) -> list[bytes]:
    """The encoded ContourImageSequence element of each slice, shared by every ROI."""
    sop_class = volume.sop_class_uid.encode("ascii")
    return [le.element(CONTOUR_IMAGE_SEQUENCE, "SQ", le.item(
        le.element(REFERENCED_SOP_CLASS_UID, "UI", sop_class)
        + le.element(REFERENCED_SOP_INSTANCE_UID, "UI", uid.encode("ascii"))))
        for uid in volume.sop_instance_uids]


CLOSED_PLANAR = le.element(CONTOUR_GEOMETRIC_TYPE, "CS", b"CLOSED_PLANAR")


def roi_loops(mask: np.ndarray, hole_style: str, min_pixels: int
              ) -> tuple[list[int], list[np.ndarray]]:
    """Slice index and closed loop (corner coordinates) of every contour of one ROI.

    Holes are joined to their region by keyhole cuts or kept as separate
    inner loops, as the destination's profile says.
    """
    slices, loops = [], []
    for z, regions in trace_volume(mask, min_pixels).items():
        for region in regions:
            for loop in ([keyhole(region.outer, region.holes)] if hole_style == "keyhole"
                         else [region.outer, *region.holes]):
                slices.append(z)
                loops.append(loop)
    return slices, loops


def contour_sequence(volume: Volume, roi: RoiMask, hole_style: str, min_pixels: int,
                     image_references: list[bytes]) -> RawDataElement:
    """The ROI's ContourSequence, encoded directly (Explicit VR Little Endian).

    Every point is placed with its own slice's position; the items carry
    their image reference, CLOSED_PLANAR, point count, number and data.
    """
    slices, loops = roi_loops(roi.mask, hole_style, min_pixels)
    parts = []
    if loops:
        counts = np.fromiter(map(len, loops), dtype=np.int64, count=len(loops))
        rows, cols = corners_to_index(np.concatenate(loops))
        points = volume.index_to_patient(np.repeat(slices, counts), rows, cols)
        texts = encode_ds_groups(points, 3 * counts)
        for number, (z, n, text) in enumerate(zip(slices, counts.tolist(), texts, strict=True),
                                              start=1):
            try:
                data = le.element(CONTOUR_DATA, "DS", text)
            except le.EncodingError:
                raise RTStructError(
                    f"ROI {roi.name}: its contour on slice {z + 1} has {n} points, more "
                    "than one ContourData value can hold") from None
            parts.append(le.item(image_references[z] + CLOSED_PLANAR
                                 + le.element(NUMBER_OF_CONTOUR_POINTS, "IS", str(n).encode())
                                 + le.element(CONTOUR_NUMBER, "IS", str(number).encode())
                                 + data))
    body = b"".join(parts)
    return RawDataElement(Tag(CONTOUR_SEQUENCE), "SQ", len(body), body, 0, False, True)


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
    ds.file_meta.MediaStorageSOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = sop_instance_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    date, time = _now()
    ds.SpecificCharacterSet = header.get("SpecificCharacterSet", profile.charset)
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.SOPClassUID = RTStructureSetStorage
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
    image_references = contour_image_references(volume)
    # ROIs are traced and encoded in parallel: the work is array operations
    # that release the interpreter lock.
    with ThreadPoolExecutor(max_workers=max(1, min(len(rois), os.cpu_count() or 1))) as pool:
        sequences = list(pool.map(
            lambda roi: contour_sequence(volume, roi, profile.hole_style, min_pixels,
                                         image_references), rois))
    for number, roi in enumerate(rois, start=1):
        item = Dataset()
        item.ROINumber = number
        item.ReferencedFrameOfReferenceUID = volume.frame_of_reference_uid
        item.ROIName = roi.name
        item.ROIGenerationAlgorithm = "AUTOMATIC"
        item.ROIGenerationDescription = info.describe(roi.engine)[:64]
        structure_rois.append(item)

        roi_contour = Dataset()
        roi_contour.ROIDisplayColor = list(roi.color)
        roi_contour.ReferencedROINumber = number
        roi_contour[CONTOUR_SEQUENCE] = sequences[number - 1]
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
    # Declared as already Explicit VR Little Endian in their own character
    # set, so pydicom copies the encoded contour items as they are instead of
    # decoding every one to look for ambiguous VRs (there are none: every
    # element here was set by keyword or copied decoded from the CT).
    for dataset in (ds, *contour_rois):
        dataset.set_original_encoding(False, True, dataset._character_set)
    return ds


def _image_ref(volume: Volume, uid: str) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = volume.sop_class_uid
    ref.ReferencedSOPInstanceUID = uid
    return ref


def check_rtstruct(ds: Dataset, volume: Volume, profile: DestinationProfile) -> list[str]:
    """Problems that would make a planning system refuse or misplace the set."""
    problems = []
    if ds.get("SOPClassUID") != RTStructureSetStorage:
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
        problem = _contour_problem(roi, images)
        if problem:
            problems.append(f"ROI {roi.get('ReferencedROINumber', '?')}: {problem}")
    return problems


def _contours(roi: Dataset) -> Iterator[tuple[int, bytes, str]]:
    """(declared point count, ContourData text, referenced image) of each contour of an ROI.

    Read from the encoded items where the sequence is still as written, from
    pydicom's datasets where it was already decoded.
    """
    element = roi.get_item(CONTOUR_SEQUENCE)
    if element is None:
        return
    if isinstance(element, RawDataElement):
        for content in le.items(element.value or b""):
            found = le.elements(content)
            image = le.elements(next(le.items(found[CONTOUR_IMAGE_SEQUENCE][1])))
            yield (int(bytes(found[NUMBER_OF_CONTOUR_POINTS][1])),
                   bytes(found[CONTOUR_DATA][1]),
                   bytes(image[REFERENCED_SOP_INSTANCE_UID][1]).rstrip(b"\0 ").decode())
        return
    for contour in element.value:
        data = contour.get_item(CONTOUR_DATA)
        text = (data.value or b"" if isinstance(data, RawDataElement)
                else "\\".join(map(str, contour.ContourData)).encode())
        yield (int(contour.NumberOfContourPoints), text,
               contour.ContourImageSequence[0].ReferencedSOPInstanceUID)


def _contour_problem(roi: Dataset, images: set[str]) -> str | None:
    """The first problem with an ROI's contours: value length, point count, image."""
    try:
        contours = list(_contours(roi))
    except (le.EncodingError, KeyError, StopIteration, ValueError, AttributeError,
            IndexError) as exc:
        return f"contour items not as written ({type(exc).__name__}: {exc})"
    if not contours:
        return None
    texts = [text.rstrip(b" ") for _, text, _ in contours]
    # All of the ROI's values at once: their lengths between separators.
    chars = np.frombuffer(b"\\".join(texts), dtype=np.uint8)
    separators = np.flatnonzero(chars == ord("\\"))
    bounds = np.concatenate(([-1], separators, [chars.size]))
    if int((np.diff(bounds) - 1).max()) > MAX_DS_LENGTH:
        return f"a DS value exceeds {MAX_DS_LENGTH} characters"
    for (points, _, image), text in zip(contours, texts, strict=True):
        values = text.count(b"\\") + 1
        if values != 3 * points or values < 9:
            return f"contour with {values // 3} points or a wrong point count"
        if image not in images:
            return "contour on an unknown image"
    return None


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
