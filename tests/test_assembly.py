"""Series completeness rules on the real ledger, with a clock the test moves."""

from __future__ import annotations

from oncoseg_node.intake.assembly import Assembler, decide, judge_counts
from oncoseg_node.ledger import JobState, Ledger
from oncoseg_node.ledger.intake import ENDED_BY_NODE_STOP, ENDED_BY_RELEASE, SeriesEvidence


def evidence(n: int, *, numbers=None, expected=None, spacing=2.5) -> SeriesEvidence:
    numbers = list(range(1, n + 1)) if numbers is None else numbers
    return SeriesEvidence(count=n, numbers=numbers, expected=expected,
                          positions=[k * spacing for k in range(n)])


def judge(ev: SeriesEvidence, interrupted=False, sender=False):
    return judge_counts(ev, interrupted=interrupted, whole_series_sender=sender,
                        tolerance_mm=0.1)


WAITS = dict(quiet_period=10, interrupted_wait=300)


def test_images_in_acquisition_equal_to_the_count_is_whole():
    counts = judge(evidence(5, expected=5))
    assert counts.whole and not counts.missing
    assert "ImagesInAcquisition 5 = instances received" in counts.notes


def test_a_short_run_is_missing_and_says_at_which_end():
    at_end = judge(evidence(50, expected=100))
    assert not at_end.whole
    assert at_end.missing == ("ImagesInAcquisition is 100: 50 missing, short run at the end "
                              "(last InstanceNumber 50 of 100)",)
    at_start = judge(evidence(50, numbers=list(range(51, 101)), expected=100))
    assert "short run at the start (first InstanceNumber 51)" in at_start.missing[0]


def test_instance_number_gaps_are_missing_only_for_an_interrupted_series():
    ev = evidence(4, numbers=[1, 2, 4, 5])
    released = judge(ev)
    assert not released.missing and "1 gap(s) (the geometry gate" in " ".join(released.notes)
    assert judge(ev, interrupted=True).missing == ("InstanceNumber 1-5 has 1 gap(s)",)
    assert judge(evidence(50, numbers=list(range(51, 101))), interrupted=True).missing


def test_whole_series_sender_needs_contiguous_numbers_and_uniform_spacing():
    assert judge(evidence(20), sender=True).whole
    assert not judge(evidence(20)).whole  # no rule configured for this sender
    uneven = SeriesEvidence(count=3, numbers=[1, 2, 3], expected=None, positions=[0, 2.5, 7.5])
    assert not judge(uneven, sender=True).whole
    assert not judge(evidence(3, numbers=[2, 3, 4]), sender=True).whole


def test_released_and_whole_closes_at_once():
    d = decide(judge(evidence(5, expected=5)), quiet_for=0.2, ended_by=ENDED_BY_RELEASE,
               receiving=False, **WAITS)
    assert d.close and not d.held and "complete without waiting" in d.reason
    assert "association released" in d.reason
    still_open = decide(judge(evidence(5, expected=5)), quiet_for=0.2,
                        ended_by=ENDED_BY_RELEASE, receiving=True, **WAITS)
    assert not still_open.close


def test_missing_slices_wait_for_the_rest_then_hold_with_the_reason():
    counts = judge(evidence(50, expected=100))
    for ended_by in (ENDED_BY_RELEASE, "A-ABORT from the sender", None):
        waiting = decide(counts, quiet_for=299, ended_by=ended_by, receiving=False, **WAITS)
        assert not waiting.close and "waiting up to 300 s" in waiting.reason
        held = decide(counts, quiet_for=301, ended_by=ended_by, receiving=False, **WAITS)
        assert held.close and held.held
        assert held.reason.startswith("incomplete: ImagesInAcquisition is 100: 50 missing")
        assert "release the job" in held.reason


def test_interrupted_without_count_evidence_waits_for_a_resend():
    counts = judge(evidence(50), interrupted=True)
    waiting = decide(counts, quiet_for=60, ended_by="connection reset or lost (A-P-ABORT)",
                     receiving=False, **WAITS)
    assert not waiting.close and "interrupted: connection reset" in waiting.reason
    closed = decide(counts, quiet_for=300, ended_by=ENDED_BY_NODE_STOP, receiving=False,
                    **WAITS)
    assert closed.close and not closed.held
    whole = decide(judge(evidence(50, expected=50), interrupted=True), quiet_for=10,
                   ended_by="A-ABORT from the sender", receiving=False, **WAITS)
    assert whole.close and not whole.held  # every announced instance is here


def test_released_without_evidence_waits_the_quiet_period():
    counts = judge(evidence(8))
    assert not decide(counts, quiet_for=9, ended_by=ENDED_BY_RELEASE, receiving=False,
                      **WAITS).close
    assert decide(counts, quiet_for=10, ended_by=ENDED_BY_RELEASE, receiving=False,
                  **WAITS).close


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(ledger: Ledger, series_uid: str, numbers, expected=None, ae="CT") -> None:
    for n in numbers:
        ledger.record_instance(sop_instance_uid=f"{series_uid}.{n}", series_uid=series_uid,
                               study_uid="8", sop_class_uid="1.2", relpath=f"objects/{n}",
                               sha256="0", size=1, calling_ae=ae, instance_number=n,
                               images_in_acquisition=expected, slice_position=2.5 * n)


def test_quiet_time_counts_only_while_listening(tmp_path):
    clock = Clock()
    ledger = Ledger(tmp_path / "l.db", clock=clock)
    record(ledger, "9", [1, 2, 3])
    ledger.association_ended(["9"], ENDED_BY_RELEASE)
    assembler = Assembler(ledger, 6, interrupted_wait_s=300)
    clock.now += 8  # the node was down longer than the quiet period
    assert assembler.poll() == []  # not listening yet
    assembler.listening()
    clock.now += 5
    assert assembler.poll() == []  # the clock started again at listening
    clock.now += 1.5
    (job_id,) = assembler.poll()
    assert ledger.job(job_id).state == JobState.QUEUED


def test_series_arriving_when_the_node_stopped_is_interrupted(tmp_path):
    clock = Clock()
    ledger = Ledger(tmp_path / "l.db", clock=clock)
    record(ledger, "9", range(1, 51))  # receiving, never ended: the node died
    record(ledger, "10", [1, 2])
    ledger.association_ended(["10"], ENDED_BY_RELEASE)
    assert ledger.interrupt_arriving() == ["9"]
    (row,) = [r for r in ledger.open_series() if r["series_uid"] == "9"]
    assert row["ended_by"] == ENDED_BY_NODE_STOP and row["receiving"] == 0
    assembler = Assembler(ledger, 1, interrupted_wait_s=30)
    assembler.listening()
    clock.now += 20
    assert [ledger.job(j).series_uid for j in assembler.poll()] == ["10"]
    clock.now += 11
    (job_id,) = assembler.poll()  # waited for a resend that never came
    assert ledger.job(job_id).series_uid == "9"


def test_incomplete_series_is_held_released_or_superseded_by_the_rest(tmp_path):
    clock = Clock()
    ledger = Ledger(tmp_path / "l.db", clock=clock)
    record(ledger, "9", range(1, 51), expected=100)
    ledger.association_ended(["9"], "A-ABORT from the sender")
    assembler = Assembler(ledger, 1, interrupted_wait_s=30)
    assembler.listening()
    clock.now += 29
    assert assembler.poll() == []
    clock.now += 2
    (held_id,) = assembler.poll()
    held = ledger.job(held_id)
    assert held.state == JobState.HELD and "50 missing" in held.reason
    assert ledger.claim(3) is None  # never contoured as if whole
    # the rest arrives on a released association: complete at once, a new version
    record(ledger, "9", range(51, 101), expected=100)
    ledger.association_ended(["9"], ENDED_BY_RELEASE)
    (job_id,) = assembler.poll()
    assert ledger.job(job_id).version == 2 and ledger.job(job_id).state == JobState.QUEUED
    assert ledger.job(held_id).state == JobState.SUPERSEDED


def test_release_contours_a_held_incomplete_series(tmp_path):
    clock = Clock()
    ledger = Ledger(tmp_path / "l.db", clock=clock)
    record(ledger, "9", range(1, 51), expected=100)
    ledger.association_ended(["9"], ENDED_BY_RELEASE)
    assembler = Assembler(ledger, 1, interrupted_wait_s=5)
    assembler.listening()
    clock.now += 6
    (job_id,) = assembler.poll()
    assert ledger.job(job_id).state == JobState.HELD
    assert ledger.release(job_id)
    claimed = ledger.claim(3)
    assert claimed is not None and claimed.id == job_id and claimed.override_geometry


def test_whole_series_sender_rule_is_per_calling_ae(tmp_path):
    clock = Clock()
    ledger = Ledger(tmp_path / "l.db", clock=clock)
    record(ledger, "1", range(1, 21), ae="CTSIM")
    record(ledger, "2", range(1, 21), ae="OTHER")
    ledger.association_ended(["1", "2"], ENDED_BY_RELEASE)
    assembler = Assembler(ledger, 10, whole_series_senders=["CTSIM"])
    assembler.listening()
    clock.now += 0.3
    assert [ledger.job(j).series_uid for j in assembler.poll()] == ["1"]


def test_schema1_ledger_gains_the_completeness_columns(tmp_path):
    from tests.test_ledger_schema1 import load_schema1

    path = tmp_path / "ledger.sqlite3"
    before = load_schema1(path)
    ledger = Ledger(path)
    rows = {r["series_uid"]: dict(r) for r in ledger.connection.query("SELECT * FROM series")}
    assert set(rows) == {r["series_uid"] for r in before["series"]}
    assert all(r["receiving"] == 0 and r["ended_by"] is None for r in rows.values())
    uid = before["instances"][0]["series_uid"]
    assert ledger.series_evidence(uid).positions == []  # written before positions were kept
    assert ledger.interrupt_arriving() == []
