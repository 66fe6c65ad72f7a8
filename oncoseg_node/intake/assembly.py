"""Series completeness: decides when a received series is complete, both ways.

The signals, all kept in the ledger except which associations are open now:

- how the last association carrying the series ended: a normal release, or
  an interruption (A-ABORT, a reset, a network timeout, the node's own stop
  or crash while the series was arriving);
- the count evidence: ImagesInAcquisition against the instances received,
  the InstanceNumber run (gaps, a short run at either end) and the slice
  positions;
- quiet time, counted from the last instance or from when the node started
  listening, whichever is later: time the node was down never counts.

The rules, each decision logged once with its evidence:

1. Released normally, no other association carrying it, and the counts whole
   (ImagesInAcquisition equals the instances received; or the sender is in
   ``series.whole_series_senders`` and InstanceNumbers 1..N are contiguous at
   uniform slice spacing): complete at once, no quiet wait.
2. The counts say slices are missing (ImagesInAcquisition above the count;
   for an interrupted series also InstanceNumber gaps or a run that does not
   start at 1): wait ``series.interrupted_wait_s`` after the last instance
   for the rest, then close into a job *held* with the reason. It is never
   contoured and sent as if whole; ``oncoseg-node release`` contours it.
3. Interrupted, and no count says it is whole: wait ``interrupted_wait_s``
   (the scanner usually resends), then close; the geometry gate still judges
   the slice positions. Interrupted with ImagesInAcquisition whole: the
   quiet period.
4. Otherwise the quiet period. On a released series InstanceNumber gaps are
   left to the geometry gate: scanners number per acquisition or skip a
   localizer, and the gate sees the positions themselves. A series whose
   association is still open but silent also closes on the quiet period
   (routers hold one association for many series); a sender that stalls
   mid-series is caught by its counts, or by the network timeout when that
   is the shorter.

A series may arrive over several associations; instances arriving after a
job started reopen the series and, once complete again, make a new version
of the job (never a split series).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from statistics import median

import structlog

from oncoseg_node.ledger import Ledger
from oncoseg_node.ledger.intake import ENDED_BY_RELEASE, SeriesEvidence
from oncoseg_node.ledger.jobs import INCOMPLETE_PREFIX

log = structlog.get_logger("oncoseg_node.intake.assembly")

FAILING_AFTER = 2  # polls failed in a row before the assembler counts as failing


@dataclass(frozen=True)
class Counts:
    """What the count evidence says: ``whole``, or the ``missing`` findings, and notes."""

    whole: bool
    missing: tuple[str, ...]
    notes: tuple[str, ...]


def uniform_spacing(positions: list[float], count: int, tolerance_mm: float) -> bool:
    """One position per instance, distinct, every gap within ``tolerance_mm`` of the median."""
    if count < 2 or len(positions) != count:
        return False
    gaps = [b - a for a, b in zip(positions, positions[1:], strict=False)]
    typical = median(gaps)
    return typical > 0 and all(abs(g - typical) <= tolerance_mm for g in gaps)


def judge_counts(evidence: SeriesEvidence, *, interrupted: bool, whole_series_sender: bool,
                 tolerance_mm: float) -> Counts:
    """Read the count evidence of one series (see the module docstring, rules 1 and 2)."""
    notes, missing = [f"{evidence.count} instances"], []
    whole = False
    numbers = sorted(set(evidence.numbers))
    first, last = (numbers[0], numbers[-1]) if numbers else (None, None)
    expected = evidence.expected
    if expected is not None:
        if evidence.count == expected:
            whole = True
            notes.append(f"ImagesInAcquisition {expected} = instances received")
        elif evidence.count < expected:
            where = []
            if first is not None and first > 1:
                where.append(f"short run at the start (first InstanceNumber {first})")
            if last is not None and last < expected:
                where.append(f"short run at the end (last InstanceNumber {last} of {expected})")
            missing.append(f"ImagesInAcquisition is {expected}: {expected - evidence.count} "
                           "missing" + (f", {' and '.join(where)}" if where else ""))
        else:
            notes.append(f"more instances than ImagesInAcquisition {expected}")
    gaps = (last - first + 1 - len(numbers)) if first is not None and last is not None else 0
    if gaps:
        text = f"InstanceNumber {first}-{last} has {gaps} gap(s)"
        if interrupted:
            missing.append(text)
        else:
            notes.append(text + " (the geometry gate judges the positions)")
    elif numbers:
        notes.append(f"InstanceNumber {first}-{last} contiguous")
        if interrupted and first is not None and first > 1 and expected is None:
            missing.append(f"short run at the start (first InstanceNumber {first})")
    if (whole_series_sender and not whole and not gaps and first == 1
            and len(numbers) == evidence.count
            and uniform_spacing(evidence.positions, evidence.count, tolerance_mm)):
        whole = True
        notes.append("whole-series sender: InstanceNumber 1..N at uniform slice spacing")
    return Counts(whole and not missing, tuple(missing), tuple(notes))


@dataclass(frozen=True)
class Decision:
    """``close``: make the job now; ``held``: make it held (slices missing); ``kind``
    names the rule, so a waiting series is logged once per rule, not per poll."""

    close: bool
    reason: str
    held: bool = False
    kind: str = ""


def decide(counts: Counts, *, quiet_for: float, quiet_period: float, interrupted_wait: float,
           ended_by: str | None, receiving: bool) -> Decision:
    """Combine the signals for one series (rules in the module docstring)."""
    interrupted = ended_by not in (None, ENDED_BY_RELEASE)
    if receiving:
        how = "association still open"
    elif ended_by == ENDED_BY_RELEASE:
        how = "association released"
    elif interrupted:
        how = f"interrupted: {ended_by}"
    else:
        how = "association end not recorded"
    evidence = "; ".join((how, f"quiet for {quiet_for:.1f} s", *counts.notes, *counts.missing))
    if counts.missing:
        if quiet_for < interrupted_wait:
            return Decision(False, f"{evidence}: waiting up to {interrupted_wait:g} s for the "
                            "rest", kind="missing")
        return Decision(True, f"{INCOMPLETE_PREFIX}{'; '.join(counts.missing)} (waited "
                        f"{quiet_for:.0f} s; {how}); release the job to contour it anyway",
                        held=True, kind="held")
    if counts.whole and ended_by == ENDED_BY_RELEASE and not receiving:
        return Decision(True, f"{evidence}: complete without waiting", kind="whole")
    if interrupted and not counts.whole and not receiving:
        if quiet_for < interrupted_wait:
            return Decision(False, f"{evidence}: waiting up to {interrupted_wait:g} s for the "
                            "sender to resend", kind="interrupted")
        return Decision(True, f"{evidence}: no count says slices are missing",
                        kind="interrupted-closed")
    if quiet_for < quiet_period:
        return Decision(False, f"{evidence}: quiet period {quiet_period:g} s", kind="quiet")
    return Decision(True, f"{evidence}: quiet period over", kind="quiet-closed")


class Assembler:
    """Closes complete series into jobs; ``poll`` runs on a timer and on every association end.

    Nothing is decided until :meth:`listening` is called: quiet time counts
    only while the node can receive the rest of a series.
    """

    def __init__(self, ledger: Ledger, quiet_period_s: float, *,
                 interrupted_wait_s: float = 300.0,
                 whole_series_senders: Collection[str] = (),
                 spacing_tolerance_mm: float = 0.1,
                 association_open: Callable[[str], bool] | None = None,
                 on_job: Callable[[int], None] | None = None) -> None:
        self.ledger = ledger
        self.quiet_period_s = quiet_period_s
        self.interrupted_wait_s = interrupted_wait_s
        self.whole_series_senders = frozenset(whole_series_senders)
        self.spacing_tolerance_mm = spacing_tolerance_mm
        self.association_open = association_open or (lambda series_uid: False)
        self.on_job = on_job or (lambda job_id: None)
        self.listening_since: float | None = None
        self._logged: dict[str, str] = {}
        self._evidence: dict[str, tuple[tuple[int, float], SeriesEvidence]] = {}
        self._wake = threading.Event()
        self.failures_in_a_row = 0
        self.last_failure: str | None = None

    def healthy(self) -> bool:
        """False while polls keep failing (a full disk, a broken ledger): for ``/healthz``.

        One failed poll may be a passing lock; two in a row is a part that fails.
        """
        return self.failures_in_a_row < FAILING_AFTER

    def listening(self, since: float | None = None) -> None:
        """The listener is up: every open series' clock starts now (or at ``since``)."""
        self.listening_since = self.ledger.clock() if since is None else since
        self.wake()

    def wake(self) -> None:
        """Decide now (an association ended) instead of at the next tick."""
        self._wake.set()

    def _evidence_of(self, series_uid: str, key: tuple[int, float]) -> SeriesEvidence:
        cached = self._evidence.get(series_uid)
        if cached is None or cached[0] != key:
            cached = (key, self.ledger.series_evidence(series_uid))
            self._evidence[series_uid] = cached
        return cached[1]

    def poll(self) -> list[int]:
        """Close every series judged complete; returns new job ids."""
        if self.listening_since is None:
            return []
        now = self.ledger.clock()
        created = []
        for row in self.ledger.open_series():
            series_uid = row["series_uid"]
            quiet_for = now - max(row["last_received_at"], self.listening_since)
            ended_by = row["ended_by"]
            evidence = self._evidence_of(series_uid, (row["instance_count"],
                                                      row["last_received_at"]))
            interrupted = ended_by not in (None, ENDED_BY_RELEASE)
            counts = judge_counts(
                evidence, interrupted=interrupted, tolerance_mm=self.spacing_tolerance_mm,
                whole_series_sender=(ended_by == ENDED_BY_RELEASE
                                     and row["calling_ae"] in self.whole_series_senders))
            decision = decide(counts, quiet_for=quiet_for, quiet_period=self.quiet_period_s,
                              interrupted_wait=self.interrupted_wait_s, ended_by=ended_by,
                              receiving=bool(row["receiving"])
                              or self.association_open(series_uid))
            bound = log.bind(series_uid=series_uid, calling_ae=row["calling_ae"])
            if not decision.close:
                if self._logged.get(series_uid) != decision.kind:
                    bound.info("series_waiting", reason=decision.reason)
                    self._logged[series_uid] = decision.kind
                continue
            self._logged.pop(series_uid, None)
            self._evidence.pop(series_uid, None)
            job_id = self.ledger.close_series(
                series_uid, held_reason=decision.reason if decision.held else None)
            if job_id is None:
                bound.info("series_complete_joined_queued_job", reason=decision.reason)
                continue
            if decision.held:
                bound.warning("series_held_incomplete", job_id=job_id,
                              instances=row["instance_count"], reason=decision.reason,
                              audit=True)
            else:
                bound.info("series_received", job_id=job_id, instances=row["instance_count"],
                           reason=decision.reason, audit=True)
            created.append(job_id)
            self.on_job(job_id)
        return created

    def run(self, stop: threading.Event, interval_s: float = 0.25) -> None:
        while not stop.is_set():
            self._wake.wait(interval_s)
            self._wake.clear()
            if stop.is_set():
                return
            try:
                self.poll()
                self.failures_in_a_row = 0
            except Exception as exc:  # keep assembling; the error is logged with its traceback
                self.failures_in_a_row += 1
                self.last_failure = f"{type(exc).__name__}: {exc}"
                log.exception("assembly_poll_failed", failures_in_a_row=self.failures_in_a_row)
