"""C-STORE request and response command sets decoded and encoded directly (PS3.7 9.3.1).

pynetdicom turns every command set into a pydicom Dataset and back, element
by element with validation, on both the request and the response: at a few
hundred instances a second that was the largest part of the receiving
process's Python time. A C-STORE command is a handful of fixed group 0000
elements in Implicit VR Little Endian, so the common case is done here with
``struct``:

- :func:`store_request` reads a C-STORE-RQ command with exactly the elements
  PS3.7 allows and plain ASCII UIDs into pynetdicom's C_STORE primitive;
  anything else (another command, an unknown element, a UID with other
  bytes) returns None and goes through pynetdicom's own decoding, which
  keeps its warnings and checks;
- :func:`store_response` encodes a C-STORE-RSP carrying a Status and at most
  an ErrorComment; one with other optional fields returns None, for
  pynetdicom to encode.

``tests/test_commands.py`` checks both against pynetdicom's own encoding.
"""

from __future__ import annotations

import re
import struct
from io import BytesIO

from pynetdicom.dimse_primitives import C_STORE

C_STORE_RQ_FIELD = 0x0001
C_STORE_RSP_FIELD = 0x8001
NO_DATA_SET = 0x0101

GROUP_LENGTH = 0x0000
AFFECTED_SOP_CLASS = 0x0002
COMMAND_FIELD = 0x0100
MESSAGE_ID = 0x0110
MESSAGE_ID_RESPONDED_TO = 0x0120
PRIORITY = 0x0700
DATA_SET_TYPE = 0x0800
STATUS = 0x0900
ERROR_COMMENT = 0x0902
AFFECTED_SOP_INSTANCE = 0x1000
MOVE_ORIGINATOR_AE = 0x1030
MOVE_ORIGINATOR_ID = 0x1031
REQUEST_ELEMENTS = frozenset({
    GROUP_LENGTH, AFFECTED_SOP_CLASS, COMMAND_FIELD, MESSAGE_ID, PRIORITY, DATA_SET_TYPE,
    AFFECTED_SOP_INSTANCE, MOVE_ORIGINATOR_AE, MOVE_ORIGINATOR_ID,
})
US_ELEMENTS = frozenset({COMMAND_FIELD, MESSAGE_ID, PRIORITY, DATA_SET_TYPE, MOVE_ORIGINATOR_ID})
# Values that take the direct path: digits and dots (padded with one NUL),
# an AE title of printable ASCII. Others are pynetdicom's to judge.
PLAIN_UID = re.compile(rb"[0-9.]{1,64}\0?")
PLAIN_AE = re.compile(rb"[ -\[\]-~]{1,16}")
ELEMENT_HEAD = struct.Struct("<HHI")


def _elements(command: bytes | memoryview) -> dict[int, bytes] | None:
    """Group 0000 elements by element number; None if not a plain group 0000 encoding."""
    found: dict[int, bytes] = {}
    at, end = 0, len(command)
    while at < end:
        if end - at < ELEMENT_HEAD.size:
            return None
        group, element, length = ELEMENT_HEAD.unpack_from(command, at)
        at += ELEMENT_HEAD.size
        if group != 0 or element in found or end - at < length:
            return None
        found[element] = bytes(command[at:at + length])
        at += length
    return found


def store_request(command: bytes | memoryview) -> C_STORE | None:
    """The C-STORE request in ``command`` (a whole command set), or None (see module)."""
    found = _elements(command)
    if found is None or not found.keys() <= REQUEST_ELEMENTS:
        return None
    try:
        numbers = {e: struct.unpack("<H", found[e])[0] for e in US_ELEMENTS if e in found}
        (group_length,) = struct.unpack("<I", found[GROUP_LENGTH])
    except (KeyError, struct.error):
        return None
    if (numbers.get(COMMAND_FIELD) != C_STORE_RQ_FIELD
            or numbers.get(DATA_SET_TYPE, NO_DATA_SET) == NO_DATA_SET
            or MESSAGE_ID not in numbers or PRIORITY not in numbers
            or group_length != len(command) - ELEMENT_HEAD.size - 4):
        return None
    uids = [found.get(AFFECTED_SOP_CLASS, b""), found.get(AFFECTED_SOP_INSTANCE, b"")]
    if not all(PLAIN_UID.fullmatch(uid) for uid in uids):
        return None
    request = C_STORE()
    request.MessageID = numbers[MESSAGE_ID]
    request.AffectedSOPClassUID = uids[0].rstrip(b"\0").decode("ascii")
    request.AffectedSOPInstanceUID = uids[1].rstrip(b"\0").decode("ascii")
    request.Priority = numbers[PRIORITY]
    if MOVE_ORIGINATOR_AE in found:
        title = found[MOVE_ORIGINATOR_AE]
        if not PLAIN_AE.fullmatch(title):
            return None
        request.MoveOriginatorApplicationEntityTitle = title.decode("ascii")
    if MOVE_ORIGINATOR_ID in numbers:
        request.MoveOriginatorMessageID = numbers[MOVE_ORIGINATOR_ID]
    request.DataSet = BytesIO()  # the data set itself goes to the spool
    return request


def _element(element: int, value: bytes) -> bytes:
    return ELEMENT_HEAD.pack(0, element, len(value)) + value


def _uid(value: object) -> bytes:
    raw = str(value).encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def store_response(response: C_STORE) -> bytes | None:
    """The command set of a C-STORE response, or None when pynetdicom should encode it."""
    if response.OffendingElement is not None or response.Status is None:
        return None
    try:
        body = [
            _element(AFFECTED_SOP_CLASS, _uid(response.AffectedSOPClassUID))
            if response.AffectedSOPClassUID else b"",
            _element(COMMAND_FIELD, struct.pack("<H", C_STORE_RSP_FIELD)),
            _element(MESSAGE_ID_RESPONDED_TO,
                     struct.pack("<H", response.MessageIDBeingRespondedTo)),
            _element(DATA_SET_TYPE, struct.pack("<H", NO_DATA_SET)),
            _element(STATUS, struct.pack("<H", response.Status)),
        ]
        if response.ErrorComment:
            comment = response.ErrorComment.encode("ascii")
            body.append(_element(ERROR_COMMENT, comment + b" " if len(comment) % 2 else comment))
        if response.AffectedSOPInstanceUID:
            body.append(_element(AFFECTED_SOP_INSTANCE, _uid(response.AffectedSOPInstanceUID)))
    except (UnicodeError, struct.error, TypeError):
        return None
    encoded = b"".join(body)
    return _element(GROUP_LENGTH, struct.pack("<I", len(encoded))) + encoded
