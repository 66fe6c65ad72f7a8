"""What intake reads of a received instance and the reasons it refuses one.

The header is parsed up to PixelData only: a large image is neither copied
nor decoded on the association thread. Each refusal is a named DIMSE status
with an ErrorComment.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import (
    JPEG2000,
    UID,
    ComprehensiveSRStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedSRStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    XRayRadiationDoseSRStorage,
)

UNDEFINED_LENGTH = 0xFFFFFFFF
PIXEL_DATA = Tag(0x7FE0, 0x0010)
PIXEL_DATA_TAG_LE = b"\xe0\x7f\x10\x00"
PIXEL_DATA_TAG_BE = b"\x7f\xe0\x00\x10"

UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
# What PACS and routers hold CT in. Each is stored as received and decoded
# by the worker (pydicom with the pylibjpeg plugins), never on an
# association thread. Nothing else is accepted: the node never takes an
# instance it cannot decode later.
COMPRESSED = [
    JPEGLosslessSV1, JPEGLossless, JPEGLSLossless, JPEG2000Lossless, RLELossless,
    DeflatedExplicitVRLittleEndian, JPEGLSNearLossless, JPEG2000, JPEGExtended12Bit,
    JPEGBaseline8Bit,
]
# pynetdicom's acceptor takes the first of its own syntaxes the requestor
# offers in a context, so this order is the node's preference: uncompressed
# first, then lossless, then lossy.
CT_SYNTAXES = UNCOMPRESSED + COMPRESSED
# A deflated data set is inflated for the header checks up to this size (a
# 4096 x 4096 CT slice and its header fit); more is refused, not allocated.
MAX_INFLATED_BYTES = 64 * 1024 * 1024
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
        # ErrorComment is LO in the default character set: printable ASCII,
        # no backslash (the value delimiter), at most 64 characters. Comments
        # may quote received bytes.
        printable = "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in self.comment)
        ds.ErrorComment = printable[:64]
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
    compressed_syntax: bool = False


def parse_instance(stream: bytes | BinaryIO, transfer_syntax: UID,
                   length: int | None = None) -> ParsedInstance:
    """Parse a received dataset's header and locate its PixelData.

    ``stream`` is the dataset as it came over the wire (no file meta), in
    ``transfer_syntax``: its bytes, or a binary file positioned at its first
    byte with ``length`` bytes of it to come (a large instance received to
    disk). Parsing stops before PixelData, so a large image is neither
    copied nor decoded on the association thread; its length is read from
    the encoding.
    """
    if isinstance(stream, bytes | bytearray | memoryview):
        fp: BinaryIO = io.BytesIO(stream)
        length = len(stream)
    else:
        fp = stream
        if length is None:
            raise ValueError("a dataset read from a file needs its length")
    if transfer_syntax.is_deflated:
        if length > MAX_INFLATED_BYTES:
            raise ValueError(f"deflated data set of {length} bytes is over the limit")
        fp = io.BytesIO(inflate(fp.read(length)))
        length = len(fp.getvalue())
    start = fp.tell()
    # Every top-level element is read (as raw bytes, converted only when
    # used) so that every UID can be checked.
    header = read_dataset(fp, transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian,
                          stop_when=_at_pixel_data)
    offset = fp.tell() - start
    fp.seek(start + offset)
    element_head = fp.read(12)
    pixel_bytes = declared = None
    encapsulated = False
    if element_head[:4] in (PIXEL_DATA_TAG_LE, PIXEL_DATA_TAG_BE):
        fmt = "<" if transfer_syntax.is_little_endian else ">"
        if transfer_syntax.is_implicit_VR:  # tag, 4-byte length
            (declared,) = struct.unpack(fmt + "I", element_head[4:8])
            value_at = offset + 8
        else:  # tag, VR, 2 reserved bytes, 4-byte length
            (declared,) = struct.unpack(fmt + "I", element_head[8:12])
            value_at = offset + 12
        if declared == UNDEFINED_LENGTH:
            encapsulated, declared = True, None
        else:
            pixel_bytes = min(declared, max(length - value_at, 0))
    compressed = transfer_syntax.is_compressed and not transfer_syntax.is_deflated
    return ParsedInstance(header, pixel_bytes, declared, encapsulated, compressed)


def inflate(stream: bytes) -> bytes:
    """The data set of a Deflated Explicit VR Little Endian stream (PS3.5 A.5)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    data = inflater.decompress(stream, MAX_INFLATED_BYTES)
    if inflater.unconsumed_tail:
        raise ValueError(f"inflates beyond {MAX_INFLATED_BYTES // (1024 * 1024)} MiB")
    return data


def _at_pixel_data(tag: Any, vr: Any, length: int) -> bool:
    return tag == PIXEL_DATA


def int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None




def slice_position(header: Dataset) -> float | None:
    """Position of the slice along its normal in mm (ImagePositionPatient . normal).

    Completeness compares these to see uniform spacing; None when either
    attribute is absent or malformed (the geometry gate judges such a series).
    """
    try:
        ipp = [float(v) for v in header.ImagePositionPatient]
        iop = [float(v) for v in header.ImageOrientationPatient]
    except (AttributeError, TypeError, ValueError):
        return None
    if len(ipp) != 3 or len(iop) != 6:
        return None
    r, c = iop[:3], iop[3:]
    normal = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    return sum(p * n for p, n in zip(ipp, normal, strict=True))
