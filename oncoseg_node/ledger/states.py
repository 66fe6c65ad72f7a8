"""Job, delivery and series states, and the one table of allowed job and delivery moves.

Every write that changes a job's or a delivery's state goes through
:func:`check_job_move` or :func:`check_delivery_move` first, inside the
transaction that makes the change, so a state can only move along an edge
listed here. Values are ``enum.StrEnum``: they compare equal to the strings
stored in the ledger and printed by ``oncoseg-node status``.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from oncoseg_node.errors import LedgerError


class JobState(StrEnum):
    """Where a series' contouring job stands. ``sent`` means every destination said Success."""

    QUEUED = "queued"
    RUNNING = "running"
    HELD = "held"
    DELIVERING = "delivering"
    SENT = "sent"
    FAILED = "failed"
    QUARANTINED = "quarantined"
    SKIPPED = "skipped"
    SUPERSEDED = "superseded"
    DISCARDED = "discarded"


class DeliveryState(StrEnum):
    """Where one structure set's delivery to one destination stands."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
    SUPERSEDED = "superseded"


class SeriesState(StrEnum):
    """``open`` while its quiet period runs, ``closed`` once a job covers it.

    ``purging`` while retention deletes its files: the rows stay until the
    files are gone, so a crash in between never leaves a file without a row.
    """

    OPEN = "open"
    CLOSED = "closed"
    PURGING = "purging"


_J = JobState
JOB_MOVES: Mapping[JobState, frozenset[JobState]] = {
    # claimed; quarantined at claim after max_attempts; an older version
    # released from hold is superseded when a newer one is written
    _J.QUEUED: frozenset({_J.RUNNING, _J.QUARANTINED, _J.SUPERSEDED}),
    # requeued (interrupted or deferred), or one of the worker's outcomes
    _J.RUNNING: frozenset({_J.QUEUED, _J.HELD, _J.SKIPPED, _J.FAILED, _J.QUARANTINED,
                           _J.DELIVERING, _J.SENT}),
    # an operator releases (geometry override) or discards; the rest of a
    # series held as incomplete arrives and its new version supersedes it
    _J.HELD: frozenset({_J.QUEUED, _J.DISCARDED, _J.SUPERSEDED}),
    # the deliveries decide; retry/resend keep it delivering
    _J.DELIVERING: frozenset({_J.SENT, _J.FAILED, _J.SUPERSEDED, _J.DELIVERING}),
    # resend
    _J.SENT: frozenset({_J.DELIVERING}),
    # retry/resend of a failed delivery, or an operator discards
    _J.FAILED: frozenset({_J.DELIVERING, _J.DISCARDED}),
    _J.QUARANTINED: frozenset({_J.DISCARDED}),
    _J.SKIPPED: frozenset({_J.DISCARDED}),
    # an operator may still resend the last structure set a series delivered
    _J.SUPERSEDED: frozenset({_J.DELIVERING}),
    _J.DISCARDED: frozenset(),  # ended for good by an operator
}

_D = DeliveryState
DELIVERY_MOVES: Mapping[DeliveryState, frozenset[DeliveryState]] = {
    _D.PENDING: frozenset({_D.PENDING, _D.DELIVERED, _D.FAILED, _D.SUPERSEDED}),
    _D.FAILED: frozenset({_D.PENDING}),       # retry, resend
    _D.DELIVERED: frozenset({_D.PENDING}),    # resend
    _D.SUPERSEDED: frozenset({_D.PENDING}),   # resend
}

# States that end a job's run: ``finished_at`` is stamped when a job enters one.
JOB_FINISHED = frozenset({_J.SENT, _J.FAILED, _J.HELD, _J.QUARANTINED, _J.SKIPPED,
                          _J.DISCARDED})
# Finished for good: a series whose jobs all ended in these may leave the spool.
# Held, failed and quarantined jobs still await a person.
JOB_DONE_FOR_GOOD = frozenset({_J.SENT, _J.SUPERSEDED, _J.SKIPPED, _J.DISCARDED})
# An operator may discard these.
JOB_DISCARDABLE = frozenset(s for s, moves in JOB_MOVES.items() if _J.DISCARDED in moves)


def job_state(value: str) -> JobState:
    """The state named ``value``; LedgerError for a name that is not a job state."""
    try:
        return JobState(value)
    except ValueError:
        raise LedgerError(f"unknown job state {value!r}") from None


def delivery_state(value: str) -> DeliveryState:
    """The state named ``value``; LedgerError for a name that is not a delivery state."""
    try:
        return DeliveryState(value)
    except ValueError:
        raise LedgerError(f"unknown delivery state {value!r}") from None


def check_job_move(job_id: int, old: str, new: str) -> JobState:
    """Return ``new`` as a JobState when ``old -> new`` is allowed, else raise LedgerError."""
    source, target = job_state(old), job_state(new)
    if target not in JOB_MOVES[source]:
        raise LedgerError(f"job {job_id} cannot go from {source} to {target}")
    return target


def check_delivery_move(delivery_id: int, old: str, new: str) -> DeliveryState:
    """Return ``new`` as a DeliveryState when ``old -> new`` is allowed, else raise LedgerError."""
    source, target = delivery_state(old), delivery_state(new)
    if target not in DELIVERY_MOVES[source]:
        raise LedgerError(f"delivery {delivery_id} cannot go from {source} to {target}")
    return target
