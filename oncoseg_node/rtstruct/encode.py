"""Explicit VR Little Endian elements and sequence items, encoded and walked directly.

A structure set holds thousands of contour items; a pydicom Dataset per item
costs more than tracing the contours, so :mod:`contour_items` encodes those
items here and :mod:`selfcheck` walks them back here. Only defined lengths are
written, and only defined lengths are accepted on the way back.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

# VRs whose explicit-VR header has two reserved bytes and a 32-bit length.
LONG_LENGTH_VRS = frozenset(
    b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
ITEM_TAG = (0xFFFE, 0xE000)
UNDEFINED_LENGTH = 0xFFFFFFFF
MAX_SHORT_LENGTH = 0xFFFF


class EncodingError(ValueError):
    """A value that cannot be encoded, or bytes that are not what the writer produces."""


def element(tag: int, vr: str, value: bytes) -> bytes:
    """One data element; the value is padded to even length (UI with NUL, text with space)."""
    if len(value) % 2:
        value += b"\0" if vr == "UI" else b" "
    group, number = tag >> 16, tag & 0xFFFF
    code = vr.encode("ascii")
    if code in LONG_LENGTH_VRS:
        return struct.pack("<HH2sHI", group, number, code, 0, len(value)) + value
    if len(value) > MAX_SHORT_LENGTH:
        raise EncodingError(f"({group:04X},{number:04X}) {vr} value of {len(value)} bytes "
                            f"exceeds the {MAX_SHORT_LENGTH} bytes its VR can hold")
    return struct.pack("<HH2sH", group, number, code, len(value)) + value


def item(content: bytes) -> bytes:
    """A sequence item of defined length around already encoded elements."""
    return struct.pack("<HHI", *ITEM_TAG, len(content)) + content


def items(value: bytes | memoryview) -> Iterator[memoryview]:
    """The items of a defined-length sequence value, each as its content."""
    view = memoryview(value)
    pos = 0
    while pos < len(view):
        if pos + 8 > len(view):
            raise EncodingError(f"truncated item header at byte {pos}")
        group, number, length = struct.unpack_from("<HHI", view, pos)
        if (group, number) != ITEM_TAG or length == UNDEFINED_LENGTH:
            raise EncodingError(f"expected an item of defined length at byte {pos}")
        if pos + 8 + length > len(view):
            raise EncodingError(f"item at byte {pos} runs past its sequence")
        yield view[pos + 8:pos + 8 + length]
        pos += 8 + length


def elements(content: bytes | memoryview) -> dict[int, tuple[str, memoryview]]:
    """The elements of an item's content: tag -> (VR, value), in the order written."""
    view = memoryview(content)
    found: dict[int, tuple[str, memoryview]] = {}
    pos = 0
    while pos < len(view):
        if pos + 8 > len(view):
            raise EncodingError(f"truncated element header at byte {pos}")
        group, number, code = struct.unpack_from("<HH2s", view, pos)
        if code in LONG_LENGTH_VRS:
            (length,) = struct.unpack_from("<I", view, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", view, pos + 6)
            start = pos + 8
        if length == UNDEFINED_LENGTH or start + length > len(view):
            raise EncodingError(f"element ({group:04X},{number:04X}) at byte {pos} has a "
                                "length that does not fit its item")
        found[(group << 16) | number] = (code.decode("ascii", "replace"),
                                         view[start:start + length])
        pos = start + length
    return found
