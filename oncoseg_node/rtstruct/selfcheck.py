"""The structure set's self-check: written, read back, and checked before it leaves.

Every check names what a planning system would refuse or misplace: the SOP
class, approval status and transfer syntax, patient and study identity, the
frame of reference and referenced series, every CT image listed, ROI name
lengths, and each contour's DS value lengths, point count and image.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage

from oncoseg_node.contouring.volume import Volume
from oncoseg_node.durable import write_durably
from oncoseg_node.errors import RTStructError
from oncoseg_node.rtstruct import encode as le
from oncoseg_node.rtstruct.contour_items import (
    CONTOUR_DATA,
    CONTOUR_IMAGE_SEQUENCE,
    CONTOUR_SEQUENCE,
    NUMBER_OF_CONTOUR_POINTS,
    REFERENCED_SOP_INSTANCE_UID,
)
from oncoseg_node.rtstruct.profiles import DestinationProfile
from oncoseg_node.rtstruct.type1 import type1_problems

MAX_DS_LENGTH = 16


def check_rtstruct(ds: Dataset, volume: Volume, profile: DestinationProfile) -> list[str]:
    """Problems that would make a planning system refuse or misplace the set."""
    problems = type1_problems(ds)
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
    """Encode, check the encoded bytes, write them durably and confirm the file holds them.

    The check parses the very bytes that are written (not the dataset in
    memory, which pydicom would re-encode); the file is then read back and
    its SHA-256 compared with theirs, so what leaves the node is what was checked.
    Raises RTStructError when either fails; a failed check writes nothing.
    """
    path = Path(path)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    data = buffer.getvalue()
    problems = check_rtstruct(pydicom.dcmread(io.BytesIO(data)), volume, profile)
    if problems:
        raise RTStructError("; ".join(problems))
    write_durably(path, data)
    if hashlib.sha256(path.read_bytes()).digest() != hashlib.sha256(data).digest():
        raise RTStructError(f"{path}: the file on disk differs from the bytes checked")
