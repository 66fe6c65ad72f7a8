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
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    XRayRadiationDoseSRStorage,
)

UNDEFINED_LENGTH = 0xFFFFFFFF
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

    ``pixel_bytes`` is how many PixelData bytes actually arrived and
    ``declared_bytes`` what its element length says (both None when there is
    no PixelData or it is encapsulated, which ``encapsulated`` tells).
    """

    header: Dataset
    pixel_bytes: int | None
    declared_bytes: int | None = None
    encapsulated: bool = False


def parse_instance(stream: bytes, transfer_syntax: UID) -> ParsedInstance:
    """Parse a received dataset's header and locate its PixelData.

    ``stream`` is the dataset as it came over the wire (no file meta), in
    ``transfer_syntax``. Parsing stops before PixelData, so a large image is
    neither copied nor decoded on the association thread; its length is read
    from the encoding.
    """
    fp = io.BytesIO(stream)
    # Every top-level element is read (as raw bytes, converted only when
    # used) so that every UID can be checked.
    header = read_dataset(fp, transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian,
                          stop_when=_at_pixel_data)
    offset = fp.tell()
    pixel_bytes = declared = None
    encapsulated = False
    if stream[offset:offset + 4] in (PIXEL_DATA_TAG_LE, PIXEL_DATA_TAG_BE):
        fmt = "<" if transfer_syntax.is_little_endian else ">"
        if transfer_syntax.is_implicit_VR:  # tag, 4-byte length
            (declared,) = struct.unpack(fmt + "I", stream[offset + 4:offset + 8])
            value_at = offset + 8
        else:  # tag, VR, 2 reserved bytes, 4-byte length
            (declared,) = struct.unpack(fmt + "I", stream[offset + 8:offset + 12])
            value_at = offset + 12
        if declared == UNDEFINED_LENGTH:
            encapsulated, declared = True, None
        else:
            pixel_bytes = min(declared, max(len(stream) - value_at, 0))
    return ParsedInstance(header, pixel_bytes, declared, encapsulated)


def _at_pixel_data(tag: Any, vr: Any, length: int) -> bool:
    return tag == PIXEL_DATA


def int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


