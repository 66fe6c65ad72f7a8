"""What ``oncoseg-node status`` reports: each job with its patient, series, protocol and deliveries.

The patient and series description are read from the series' first stored
instance (the ledger keeps no patient data); times are ISO 8601 with the
node's UTC offset, in the JSON and the text alike, so a reader never has to
guess a time zone or convert epoch seconds.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pydicom

from oncoseg_node.intake.spool import Spool
from oncoseg_node.ledger import DeliveryState, JobState, Ledger

PATIENT_TAGS = ["PatientName", "PatientID", "StudyDate", "SeriesDescription", "Modality"]


def iso(timestamp: float | None) -> str | None:
    """ISO 8601 local time with its UTC offset, to the second (None stays None)."""
    if timestamp is None:
        return None
    return dt.datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def series_header(ledger: Ledger, spool: Spool, series_uid: str) -> dict[str, str]:
    """Patient and series attributes from the series' first stored instance ({} if none)."""
    relpaths = ledger.series_instances(series_uid)
    if not relpaths:
        return {}  # purged by retention, or never stored
    try:
        ds = pydicom.dcmread(spool.path(relpaths[0]), stop_before_pixels=True,
                             specific_tags=PATIENT_TAGS)
    except Exception:  # one unreadable file must not hide the other jobs
        return {}
    return {tag: str(ds.get(tag, "") or "") for tag in PATIENT_TAGS}


def job_rows(ledger: Ledger, spool: Spool, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` jobs as JSON-ready dictionaries."""
    rows = []
    for job in ledger.jobs(limit=limit):
        header = series_header(ledger, spool, job.series_uid)
        deliveries = []
        for d in ledger.deliveries(job_id=job.id):
            deliveries.append({
                "destination": d.destination, "state": d.state, "attempts": d.attempts,
                "status": d.last_status, "reason": d.reason,
                "next_attempt_at": iso(d.next_attempt_at)
                if d.state == DeliveryState.PENDING else None,
                "delivered_at": iso(d.delivered_at), "sop_instance_uid": d.sop_instance_uid})
        rows.append({
            "job": job.id, "series_uid": job.series_uid, "version": job.version,
            "state": job.state, "attempts": job.attempts, "reason": job.reason,
            # a deferred job: its next attempt waits until then (newer series go first)
            "retry_after": iso(job.not_before)
            if job.state == JobState.QUEUED and job.attempts else None,
            "patient_name": header.get("PatientName"), "patient_id": header.get("PatientID"),
            "series_description": header.get("SeriesDescription"),
            "protocol": job.protocol, "protocol_version": job.protocol_version,
            "calling_ae": job.calling_ae, "rtstruct_uid": job.rtstruct_uid,
            "created_at": iso(job.created_at), "started_at": iso(job.started_at),
            "finished_at": iso(job.finished_at), "stage_seconds": job.stage_seconds,
            "override_finding": job.override_finding, "structures": job.results,
            "deliveries": deliveries,
        })
    return rows


def render_text(rows: list[dict[str, Any]]) -> str:
    """The rows for a terminal: one block per job."""
    if not rows:
        return "no jobs"
    lines = []
    for row in rows:
        patient = row["patient_name"] or "-"
        if row["patient_id"]:
            patient += f" ({row['patient_id']})"
        lines.append(f"job {row['job']:>5}  v{row['version']}  {row['state']:<11} "
                     f"{row['created_at']}  {row['protocol'] or '-'}")
        lines.append(f"           patient {patient}; series {row['series_description'] or '-'!r} "
                     f"{row['series_uid']}")
        if row["stage_seconds"]:
            lines.append("           stages: " + ", ".join(
                f"{k} {v:.1f} s" for k, v in row["stage_seconds"].items()))
        if row["override_finding"]:
            lines.append(f"           released despite: {row['override_finding']}")
        if row["reason"]:
            lines.append(f"           reason: {row['reason']}")
        if row["retry_after"]:
            lines.append(f"           next attempt after {row['retry_after']}")
        for d in row["deliveries"]:
            count = f"{d['attempts']} attempt{'' if d['attempts'] == 1 else 's'}"
            if d["state"] == DeliveryState.DELIVERED:
                text = f"delivered after {count}"
            elif d["state"] == DeliveryState.PENDING:
                text = f"pending, {count} so far, next attempt {d['next_attempt_at']}"
            else:
                text = f"{d['state']} after {count}"
            delivered = d["state"] == DeliveryState.DELIVERED
            extra = f" ({d['reason']})" if d["reason"] and not delivered else ""
            lines.append(f"           -> {d['destination']}: {text}{extra}")
    return "\n".join(lines)
