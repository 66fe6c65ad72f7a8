"""Storage Commitment reports: the destination's N-EVENT-REPORT ends a delivery.

A destination that commits reports on an association of its own, acting as
SCP of the Storage Commitment Push Model; the node accepts that role on its
listener. This module offers that service to the receiver through its
extension point (:class:`oncoseg_node.intake.transport.ExtraService`), so the
receiver knows nothing of deliveries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from oncoseg_node.dicom import status
from oncoseg_node.intake.transport import ExtraService
from oncoseg_node.ledger import Ledger

log = structlog.get_logger("oncoseg_node.delivery")


class CommitmentReports:
    """Records each destination's commitment result against its delivery."""

    def __init__(self, ledger: Ledger,
                 on_committed: Callable[[int], None] | None = None) -> None:
        self.ledger = ledger
        # told the delivery id a destination committed to (delivery latency)
        self.on_committed = on_committed or (lambda delivery_id: None)

    def service(self) -> ExtraService:
        return ExtraService(
            contexts=[(StorageCommitmentPushModel,
                       [ExplicitVRLittleEndian, ImplicitVRLittleEndian], True, True)],
            bindings=[(evt.EVT_N_EVENT_REPORT, self.handle_report)],
        )

    def handle_report(self, event: Any) -> tuple[int, None]:
        """A destination's Storage Commitment result for one of our deliveries."""
        info = event.event_information
        transaction_uid = str(info.get("TransactionUID", "") or "")
        failed = info.get("FailedSOPSequence") or []
        committed = int(event.request.EventTypeID) == 1 and not failed
        if committed:
            reason = "committed by destination"
        else:
            reasons = sorted({f"0x{int(item.get('FailureReason', 0)):04X}" for item in failed})
            reason = f"destination did not commit (failure reason {', '.join(reasons)})"
        delivery_id = self.ledger.commitment_report(transaction_uid, committed, reason)
        log.info("storage_commitment_report", transaction_uid=transaction_uid,
                 committed=committed, delivery_id=delivery_id, reason=reason,
                 calling_ae=str(event.assoc.requestor.ae_title).strip(), audit=committed)
        if committed and delivery_id is not None:
            self.on_committed(delivery_id)
        return status.SUCCESS, None
