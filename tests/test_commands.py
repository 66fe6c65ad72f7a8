"""The directly coded C-STORE command sets against pynetdicom's own encoding."""

from __future__ import annotations

from io import BytesIO

import pytest
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode, encode

from oncoseg_node.intake.commands import store_request, store_response

CT = "1.2.840.10008.5.1.4.1.1.2"


def pynetdicom_command(message_class, primitive: C_STORE) -> bytes:
    message = message_class()
    message.primitive_to_message(primitive)
    pdata = next(iter(message.encode_msg(1, 1 << 20)))
    _cid, value = pdata.presentation_data_value_list[0]
    return bytes(value[1:])


def request(**extra) -> C_STORE:
    primitive = C_STORE()
    primitive.MessageID = 7
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.123"  # odd length: padded
    primitive.Priority = 2
    primitive.DataSet = BytesIO(b"\0\0")
    for keyword, value in extra.items():
        setattr(primitive, keyword, value)
    return primitive


@pytest.mark.parametrize("extra", [{}, {"MoveOriginatorApplicationEntityTitle": "PACS",
                                        "MoveOriginatorMessageID": 3}])
def test_request_decoded_as_pynetdicom_does(extra):
    sent = request(**extra)
    decoded = store_request(pynetdicom_command(C_STORE_RQ, sent))
    assert decoded is not None
    for keyword in ("MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID", "Priority",
                    "MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID"):
        assert getattr(decoded, keyword) == getattr(sent, keyword), keyword
    assert decoded.is_valid_request


def test_unusual_requests_are_left_to_pynetdicom():
    command = pynetdicom_command(C_STORE_RQ, request())
    assert store_request(command[:-3]) is None  # cut short
    assert store_request(command + encode_extra()) is None  # an element C-STORE has not
    non_ascii = pynetdicom_command(C_STORE_RQ, request()).replace(b".123", b".12\xe9")
    assert store_request(non_ascii) is None


def encode_extra() -> bytes:
    from pydicom.dataset import Dataset
    ds = Dataset()
    ds.NumberOfRemainingSuboperations = 1  # (0000,1020): a C-GET/C-MOVE element
    return encode(ds, True, True)


@pytest.mark.parametrize("status, comment", [(0x0000, None), (0xA700, "disk full"),
                                             (0xC000, "odd")])
def test_response_encoded_as_pynetdicom_does(status, comment):
    response = C_STORE()
    response.MessageIDBeingRespondedTo = 7
    response.AffectedSOPClassUID = CT
    response.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.123"
    response.Status = status
    if comment:
        response.ErrorComment = comment
    ours = store_response(response)
    assert ours == pynetdicom_command(C_STORE_RSP, response)
    assert decode(BytesIO(ours), True, True).Status == status


def test_response_with_offending_element_is_left_to_pynetdicom():
    response = C_STORE()
    response.MessageIDBeingRespondedTo = 7
    response.Status = 0xC000
    response.OffendingElement = [0x00100010]
    assert store_response(response) is None
