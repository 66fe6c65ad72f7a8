"""The checks a received instance passes before the node answers Success.

Each failed check is its own named status (``dicom.status``) with an
ErrorComment naming the attribute and its value, so the sender's log says
what to fix. Run on the header parsed by ``headers.parse_instance``: nothing
is decoded here.

- Every element of the dataset's top level has a VR of PS3.5 6.2, and every
  UID of the dataset's top level and of the command is conformant
  (PS3.5 9.1: at most 64 characters, digits in dot-separated components, no
  component with a leading zero): UIDs are copied into the structure set the
  planning system receives, and a NUL or a 200-character UID there is worse
  than a refusal here.
- CT Image Storage carries Modality CT and an Image Pixel module a CT volume
  can be built from (PS3.3 C.7.6.3 and C.8.2.1), with PixelData exactly as
  long as Rows x Columns x SamplesPerPixel x BitsAllocated / 8 imply (plus
  the one pad byte of an odd length) when it is not encapsulated, and a
  RescaleSlope and RescaleIntercept that give HU (``dicom.rescale``).
"""

from __future__ import annotations

import re
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage
from pydicom.valuerep import VR

from oncoseg_node.dicom import status
from oncoseg_node.dicom.rescale import rescale
from oncoseg_node.intake.headers import ParsedInstance, Refusal

UID_MAX_CHARS = 64
KNOWN_VRS = frozenset(str(v) for v in VR)
UID_PATTERN = re.compile(rb"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
COMMAND_UIDS = ("AffectedSOPClassUID", "AffectedSOPInstanceUID")
# CT Image module (PS3.3 C.8.2.1.1): 16 bits allocated, 12 to 16 stored,
# one sample. A matrix above 4096 is no CT a planning system takes.
CT_BITS_ALLOCATED = (16,)
CT_BITS_STORED = range(12, 17)
MAX_MATRIX = 4096


def uid_problem(value: bytes | str) -> str | None:
    """Why ``value`` is not a conformant UID (None when it is one)."""
    raw = value.encode("latin-1", "replace") if isinstance(value, str) else value
    # An odd-length UID is padded to even length with one NUL (PS3.5 6.2).
    raw = raw[:-1] if raw.endswith(b"\0") else raw
    raw = raw.rstrip(b" ")
    if not raw:
        return "empty"
    if len(raw) > UID_MAX_CHARS:
        return f"{len(raw)} characters (at most {UID_MAX_CHARS})"
    if UID_PATTERN.fullmatch(raw) is None:
        return "not digits in dot-separated components without leading zeros"
    return None


def check_command(command: Any) -> Refusal | None:
    """Refuse a C-STORE whose command UIDs are not conformant (before any file is written)."""
    for keyword in COMMAND_UIDS:
        raw = getattr(command, keyword, None)
        problem = uid_problem(str(raw) if raw is not None else "")
        if problem is not None:
            return Refusal(status.UID_NOT_CONFORMANT, f"{keyword} {problem}")
    return None


def check_header(parsed: ParsedInstance, command: Any) -> Refusal | None:
    """Reasons to refuse an instance before anything is stored."""
    ds = parsed.header
    for keyword in REQUIRED_UIDS:
        if keyword not in ds or not ds.get_item(keyword).value:
            return Refusal(status.CANNOT_UNDERSTAND, f"{keyword} missing")
    refusal = _check_elements(ds)
    if refusal is not None:
        return refusal
    if str(ds.SOPInstanceUID) != str(command.AffectedSOPInstanceUID):
        return Refusal(status.CANNOT_UNDERSTAND, "SOPInstanceUID differs from the command's")
    if str(ds.SOPClassUID) != str(command.AffectedSOPClassUID):
        return Refusal(status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                       "SOPClassUID differs from the command's")
    if str(ds.SOPClassUID) == CTImageStorage:
        modality = str(ds.get("Modality", "") or "").strip()
        if modality != "CT":
            return Refusal(status.MODALITY_DOES_NOT_MATCH_SOP_CLASS,
                           f"Modality {modality or 'missing'!r}, CT Image Storage needs CT")
        problem = rescale(ds)
        if isinstance(problem, str):
            return Refusal(status.RESCALE_INVALID, problem)
        return _check_pixels(parsed)
    return None


def _check_elements(ds: Dataset) -> Refusal | None:
    """Every top-level element has a known VR, and every UI value is a conformant UID."""
    for tag in ds.keys():  # noqa: SIM118 - iterating a Dataset converts every element
        raw = ds.get_item(tag)
        vr = getattr(raw, "VR", None)
        if vr is not None and str(vr) not in KNOWN_VRS:
            # Stored, it would fail whoever reads the element later (the
            # structure set writer copies patient and study attributes).
            return Refusal(status.ELEMENT_VR_UNKNOWN, f"{_tag_name(tag)} has unknown VR {vr!r}")
        if vr is None:  # implicit VR: from the dictionary (private tags have none)
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                continue
        if vr != "UI" or raw.value is None:
            continue
        value = raw.value if isinstance(raw.value, bytes) else str(raw.value).encode()
        for part in value.split(b"\\"):  # UI may be multi-valued
            problem = uid_problem(part)
            if problem is not None:
                return Refusal(status.UID_NOT_CONFORMANT, f"{_tag_name(tag)} {problem}")
    return None


def _tag_name(tag: Any) -> str:
    return keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _check_pixels(parsed: ParsedInstance) -> Refusal | None:
    ds = parsed.header
    values: dict[str, int] = {}
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "SamplesPerPixel",
                    "PixelRepresentation"):
        value = ds.get(keyword)
        try:
            values[keyword] = int(value)
        except (TypeError, ValueError):
            return Refusal(status.IMAGE_PIXEL_MODULE_INVALID,
                           f"{keyword} {'missing' if value is None else repr(value)}")
    for keyword, allowed in (
        ("Rows", range(1, MAX_MATRIX + 1)), ("Columns", range(1, MAX_MATRIX + 1)),
        ("BitsAllocated", CT_BITS_ALLOCATED), ("SamplesPerPixel", (1,)),
        ("PixelRepresentation", (0, 1)),
    ):
        if values[keyword] not in allowed:
            return Refusal(status.IMAGE_PIXEL_MODULE_INVALID,
                           f"{keyword} {values[keyword]} not allowed for CT")
    if values["BitsStored"] not in CT_BITS_STORED or values["BitsStored"] > values[
            "BitsAllocated"]:
        return Refusal(status.IMAGE_PIXEL_MODULE_INVALID,
                       f"BitsStored {values['BitsStored']} not 12-16 within BitsAllocated")
    frames_value = ds.get("NumberOfFrames", 1)
    try:
        frames = int(frames_value) if frames_value not in (None, "") else 1
    except (TypeError, ValueError):
        frames = 0
    if frames != 1:  # CT Image Storage is single-frame
        return Refusal(status.IMAGE_PIXEL_MODULE_INVALID, f"NumberOfFrames {frames_value!r}")
    if parsed.pixel_bytes is None and not parsed.encapsulated:
        return Refusal(status.PIXEL_DATA_MISSING, "PixelData missing")
    if parsed.compressed_syntax != parsed.encapsulated:
        return Refusal(status.PIXEL_DATA_LENGTH_WRONG,
                       "PixelData encapsulation does not match the transfer syntax")
    if parsed.encapsulated:
        return None  # the codec decides the length: checked when the worker decodes
    if parsed.pixel_bytes is None:
        return Refusal(status.PIXEL_DATA_MISSING, "PixelData missing")
    expected = (values["Rows"] * values["Columns"] * values["SamplesPerPixel"]
                * values["BitsAllocated"] // 8)
    allowed_lengths = (expected, expected + 1) if expected % 2 else (expected,)
    if parsed.pixel_bytes not in allowed_lengths or parsed.declared_bytes != parsed.pixel_bytes:
        return Refusal(status.PIXEL_DATA_LENGTH_WRONG,
                       f"PixelData {parsed.declared_bytes} bytes, expected {expected}")
    return None
