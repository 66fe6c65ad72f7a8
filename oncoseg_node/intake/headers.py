"""What intake reads of a received instance and the reasons it refuses one.

The header is parsed up to PixelData only: a large image is neither copied
nor decoded on the association thread. Each refusal is a named DIMSE status
with an ErrorComment.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    UID,
    ComprehensiveSRStorage,
    CTImageStorage,
    EnhancedSRStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    XRayRadiationDoseSRStorage,
)

from oncoseg_node.dicom import status

UNDEFINED_LENGTH = 0xFFFFFFFF
# Only what intake decides on is converted from the encoding; the file keeps
# every element as received.
HEADER_TAGS: list[BaseTag | int] = [Tag(keyword) for keyword in (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "SeriesDescription", "ImageType", "InstanceNumber", "ImagesInAcquisition",
    "Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "NumberOfFrames",
)]
PIXEL_DATA = Tag(0x7FE0, 0x0010)
PIXEL_DATA_TAG_LE = b"\xe0\x7f\x10\x00"
PIXEL_DATA_TAG_BE = b"\x7f\xe0\x00\x10"

# Compressed transfer syntaxes are refused at negotiation: the node never
# accepts an instance it cannot decode later.
UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
# Objects a CT simulator sends alongside the images. They are acknowledged so
# the scanner's send job completes, logged, and not stored.
IGNORED_SOP_CLASSES: dict[str, str] = {uid: uid.name for uid in (
    XRayRadiationDoseSRStorage, EnhancedSRStorage, ComprehensiveSRStorage,
    SecondaryCaptureImageStorage,
)}


@dataclass(frozen=True)
class Refusal:
    status: int
    comment: str

    def as_dataset(self) -> Dataset:
        ds = Dataset()
        ds.Status = self.status
        ds.ErrorComment = self.comment[:64]
        return ds


@dataclass(frozen=True)
class ParsedInstance:
    """A received instance's header, parsed without copying its pixel data.

    ``pixel_bytes`` is how many PixelData bytes actually arrived (None when
    there is no PixelData or it is encapsulated with undefined length).
    """

    header: Dataset
    pixel_bytes: int | None


def parse_instance(stream: bytes, transfer_syntax: UID) -> ParsedInstance:
    """Parse a received dataset's header and locate its PixelData.

    ``stream`` is the dataset as it came over the wire (no file meta), in
    ``transfer_syntax``. Parsing stops before PixelData, so a large image is
    neither copied nor decoded on the association thread; its length is read
    from the encoding.
    """
    fp = io.BytesIO(stream)
    header = read_dataset(fp, transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian,
                          stop_when=_at_pixel_data, specific_tags=HEADER_TAGS)
    offset = fp.tell()
    pixel_bytes = None
    if stream[offset:offset + 4] in (PIXEL_DATA_TAG_LE, PIXEL_DATA_TAG_BE):
        fmt = "<" if transfer_syntax.is_little_endian else ">"
        if transfer_syntax.is_implicit_VR:  # tag, 4-byte length
            (declared,) = struct.unpack(fmt + "I", stream[offset + 4:offset + 8])
            value_at = offset + 8
        else:  # tag, VR, 2 reserved bytes, 4-byte length
            (declared,) = struct.unpack(fmt + "I", stream[offset + 8:offset + 12])
            value_at = offset + 12
        if declared != UNDEFINED_LENGTH:
            pixel_bytes = min(declared, max(len(stream) - value_at, 0))
    return ParsedInstance(header, pixel_bytes)


def _at_pixel_data(tag: Any, vr: Any, length: int) -> bool:
    return tag == PIXEL_DATA


def check_header(parsed: ParsedInstance, command: Any) -> Refusal | None:
    """Reasons to refuse an instance before anything is stored."""
    ds = parsed.header
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not str(ds.get(keyword, "") or "").strip():
            return Refusal(status.CANNOT_UNDERSTAND, f"{keyword} missing")
    if str(ds.SOPInstanceUID) != str(command.AffectedSOPInstanceUID):
        return Refusal(status.CANNOT_UNDERSTAND, "SOPInstanceUID differs from the command's")
    if str(ds.SOPClassUID) != str(command.AffectedSOPClassUID):
        return Refusal(status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                       "SOPClassUID differs from the command's")
    if str(ds.SOPClassUID) == CTImageStorage:
        return _check_pixel_length(parsed)
    return None


def _check_pixel_length(parsed: ParsedInstance) -> Refusal | None:
    ds = parsed.header
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return Refusal(status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "image pixel module incomplete")
    expected = rows * cols * samples * frames * bits // 8
    if parsed.pixel_bytes is None:
        return Refusal(status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "PixelData missing")
    if parsed.pixel_bytes < expected:
        return Refusal(
            status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            f"PixelData has {parsed.pixel_bytes} bytes, expected {expected}",
        )
    return None


def int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


