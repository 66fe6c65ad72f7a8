"""Masks plus their CT series -> an RT Structure Set marked as an automatic draft.

Every contour point is mapped with its own slice's ImagePositionPatient,
ImageOrientationPatient and PixelSpacing (no series-wide matrix), so
non-uniform spacing and any patient position stay exact. Contours follow
pixel edges (:mod:`contours`) and are encoded by :mod:`contour_items`; holes
are written the way the destination's profile says (keyhole cut or separate
inner contour). Coordinates are DICOM patient coordinates in mm (LPS). The
object says what it is: ApprovalStatus UNAPPROVED, a label and description
marking automatic contours for review. :mod:`selfcheck` writes it and checks
the file it wrote.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid

from oncoseg_node import __version__
from oncoseg_node.contouring.mask_crop import MaskCrop
from oncoseg_node.contouring.volume import Volume
from oncoseg_node.dicom.filemeta import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from oncoseg_node.errors import RTStructError
from oncoseg_node.rtstruct.contour_items import (
    CONTOUR_SEQUENCE,
    contour_image_references,
    contour_sequence,
)
from oncoseg_node.rtstruct.profiles import DestinationProfile

# RT Referenced Study Sequence items reference the study by this SOP class
# (Study Component Management), as planning systems expect. It is retired, so
# neither pydicom nor pynetdicom names it.
STUDY_COMPONENT_MANAGEMENT = "1.2.840.10008.3.1.2.3.2"

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
    """One structure to write: ``mask`` is ``(z, y, x)`` on the volume's grid, or its crop.

    A crop is traced within its box; a full array is traced as it is.
    """

    name: str
    color: tuple[int, int, int]
    interpreted_type: str
    mask: np.ndarray | MaskCrop
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
    # compact identities for the 64-character ROIGenerationDescription (weights and
    # adapter hashes), where the full ``models`` text would be cut before the adapter
    short_models: Mapping[str, str] = field(default_factory=dict)

    def describe(self, engine: str | None = None, limit: int = 64) -> str:
        """ROIGenerationDescription (LO, 64 characters): the protocol version always fits."""
        engine = engine or self.engine
        suffix = f"; protocol {self.protocol_name}@{self.protocol_version}"
        head = f"{engine}: {self.short_models.get(engine) or self.models.get(engine, self.model)}"
        return head[:max(limit - len(suffix), 8)] + suffix[:limit]

    def full(self) -> str:
        models = "; ".join(f"{k}: {v}" for k, v in sorted(self.models.items())) or \
            f"{self.engine}: {self.model}"
        return (f"oncoseg-node {__version__}; protocol {self.protocol_name} version "
                f"{self.protocol_version}; {models}")


def _now() -> tuple[str, str]:
    now = _dt.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def build_rtstruct(volume: Volume, rois: Sequence[RoiMask], info: GenerationInfo,
                   profile: DestinationProfile, *, sop_instance_uid: str | None = None,
                   series_instance_uid: str | None = None,
                   min_island_mm2: float = 0.0, label: str = STRUCTURE_SET_LABEL,
                   notes: Sequence[str] = (), predecessor_uid: str | None = None,
                   workers: int | None = None) -> Dataset:
    """The RT Structure Set for ``rois`` over ``volume`` (not yet written).

    ``workers`` threads trace the ROIs (default: one per core).

    ``label`` is the StructureSetLabel (SH, 16 characters) a planning system
    lists the set under; ``notes`` (structures not found, geometry findings an
    operator overrode) go into the StructureSetDescription ahead of the
    generation details, so truncation to 1024 characters never drops them;
    ``predecessor_uid`` is the SOP Instance UID of the structure set this one
    replaces (Predecessor Structure Set Sequence).
    """
    if not label or len(label) > 16:
        raise RTStructError(f"StructureSetLabel {label!r} must be 1 to 16 characters")
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
    ds.StructureSetLabel = label
    ds.StructureSetName = "AUTO DRAFT FOR REVIEW"
    warning = ("Automatic contours, not approved: review and edit every structure before "
               "clinical use. " + " ".join(notes)).strip()
    ds.StructureSetDescription = (warning + " " + info.full())[:1024]
    if predecessor_uid:
        predecessor = Dataset()
        predecessor.ReferencedSOPClassUID = RTStructureSetStorage
        predecessor.ReferencedSOPInstanceUID = predecessor_uid
        ds.PredecessorStructureSetSequence = DicomSequence([predecessor])
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
    threads = workers if workers is not None else (os.cpu_count() or 1)
    # Largest boxes first, so that the longest (body, bones) run side by side
    # rather than one of them last and alone.
    order = sorted(range(len(rois)), key=lambda i: -_extent(rois[i].mask))
    with ThreadPoolExecutor(max_workers=max(1, min(len(rois), threads))) as pool:
        traced = dict(zip(order, pool.map(
            lambda i: contour_sequence(volume, rois[i].name, rois[i].mask, profile.hole_style,
                                       min_pixels, image_references), order), strict=True))
    sequences = [traced[i] for i in range(len(rois))]
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
        if sequences[number - 1].length:
            # ContourSequence is Type 3 but, when present, needs an item
            # (PS3.3 C.8.8.6): an ROI with nothing to draw leaves it out.
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


def _extent(mask: np.ndarray | MaskCrop) -> int:
    """Voxels the tracer scans for one ROI: its crop's, or the whole array's."""
    return int(mask.array.size if isinstance(mask, MaskCrop) else mask.size)


def _image_ref(volume: Volume, uid: str) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = volume.sop_class_uid
    ref.ReferencedSOPInstanceUID = uid
    return ref
