"""C-STORE SCU: send one stored object to one destination and classify the outcome.

Every attempt ends in one :class:`SendResult`: delivered (Success, or a
Warning which the standard counts as stored), retry (association refused or
aborted, timeout, 0xA7xx out of resources: a later attempt can succeed) or
failed (0xA9xx, 0xCxxx and other failures: retrying cannot help).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
)

from oncoseg_node.config import DestinationConfig
from oncoseg_node.dicom import status


class SendResult(StrEnum):
    """What one attempt achieved; also the ``outcome`` label of the attempt metric."""

    DELIVERED = "delivered"  # the destination holds the object (or accepted the request)
    RETRY = "retry"          # a later attempt can succeed
    FAILED = "failed"        # retrying cannot help


@dataclass(frozen=True)
class SendOutcome:
    result: SendResult
    status: int | None
    reason: str


def _failure(code: int) -> SendResult:
    """A status that is neither Success nor Warning: retry only when it can pass."""
    return SendResult.RETRY if status.is_transient(code) else SendResult.FAILED


def _set_nodelay(assoc: object) -> None:
    # Small DIMSE PDUs otherwise wait for the peer's delayed ACK (~40 ms each).
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def send_file(path: Path, dest: DestinationConfig, calling_ae_title: str) -> SendOutcome:
    """Send the DICOM file at ``path`` to ``dest`` in one association."""
    ds = pydicom.dcmread(path)
    ae = AE(ae_title=dest.calling_ae_title or calling_ae_title)
    ae.add_requested_context(ds.SOPClassUID, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.acse_timeout = dest.timeout_s
    ae.dimse_timeout = dest.timeout_s
    ae.network_timeout = dest.timeout_s
    ae.connection_timeout = dest.timeout_s
    ae.maximum_pdu_size = dest.max_pdu
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        if assoc.is_rejected:
            reason = "association rejected"
            acceptor = getattr(assoc, "acceptor", None)
            primitive = getattr(acceptor, "primitive", None)
            if primitive is not None and primitive.result_str:
                reason += f" ({primitive.result_str}, {primitive.reason_str})"
        elif assoc.is_aborted and assoc.rejected_contexts and not assoc.accepted_contexts:
            # The destination refuses the SOP class itself: retrying cannot help.
            return SendOutcome(SendResult.FAILED, None,
                               f"destination does not accept {ds.SOPClassUID.name} "
                               "(presentation context rejected)")
        elif assoc.is_aborted:
            reason = "association aborted during negotiation"
        else:
            reason = f"cannot connect to {dest.host}:{dest.port}"
        return SendOutcome(SendResult.RETRY, None, reason)
    try:
        _set_nodelay(assoc)
        response = assoc.send_c_store(ds)
    finally:
        if assoc.is_established:
            assoc.release()
    code = getattr(response, "Status", None)
    if code is None:
        return SendOutcome(SendResult.RETRY, None, "no response (timeout or association aborted)")
    code = int(code)
    comment = str(response.get("ErrorComment", "") or "")
    reason = status.describe(code) + (f": {comment}" if comment else "")
    if code == status.SUCCESS or status.is_warning(code):
        return SendOutcome(SendResult.DELIVERED, code, reason)
    return SendOutcome(_failure(code), code, reason)


REQUEST_STORAGE_COMMITMENT = 1  # N-ACTION Action Type ID


def request_commitment(path: Path, dest: DestinationConfig, calling_ae_title: str,
                       transaction_uid: str) -> SendOutcome:
    """Ask ``dest`` to commit to the object at ``path`` (Storage Commitment Push Model).

    ``delivered`` here means the request was accepted; the commitment itself
    arrives later as an N-EVENT-REPORT on the node's listener.
    """
    header = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["SOPClassUID", "SOPInstanceUID"])
    request = Dataset()
    request.TransactionUID = transaction_uid
    item = Dataset()
    item.ReferencedSOPClassUID = header.SOPClassUID
    item.ReferencedSOPInstanceUID = header.SOPInstanceUID
    request.ReferencedSOPSequence = [item]
    ae = AE(ae_title=dest.calling_ae_title or calling_ae_title)
    ae.add_requested_context(StorageCommitmentPushModel,
                             [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = dest.timeout_s
    ae.connection_timeout = dest.timeout_s
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        return SendOutcome(SendResult.RETRY, None,
                           "storage commitment: association not established")
    try:
        _set_nodelay(assoc)
        response, _reply = assoc.send_n_action(
            request, REQUEST_STORAGE_COMMITMENT, StorageCommitmentPushModel,
            StorageCommitmentPushModelInstance)
    finally:
        if assoc.is_established:
            assoc.release()
    code = getattr(response, "Status", None)
    if code is None:
        return SendOutcome(SendResult.RETRY, None, "storage commitment: no response")
    code = int(code)
    reason = "storage commitment request " + status.describe(code)
    if code == status.SUCCESS:
        return SendOutcome(SendResult.DELIVERED, code, reason)
    return SendOutcome(_failure(code), code, reason)
