from __future__ import annotations

from oncoseg_node.intake.assembly import Assembler, decide
from oncoseg_node.ledger import Ledger


def test_quiet_period_is_required():
    d = decide(quiet_for=3, quiet_period=10, count=5, numbers=[1, 2, 3, 4, 5], expected=None,
               association_open=False)
    assert not d.close


def test_complete_evidence_closes_and_says_why():
    d = decide(quiet_for=10.5, quiet_period=10, count=5, numbers=[1, 2, 3, 4, 5], expected=5,
               association_open=False)
    assert d.close and not d.incomplete
    assert "quiet for 10.5 s" in d.reason and "association ended" in d.reason
    assert "InstanceNumber 1-5 contiguous" in d.reason


def test_gaps_with_open_association_extend_the_wait_but_not_forever():
    kw = dict(quiet_period=10, count=4, numbers=[1, 2, 4, 5], expected=None,
              association_open=True)
    waiting = decide(quiet_for=12, **kw)
    assert not waiting.close and "1 gap(s)" in waiting.reason
    closed = decide(quiet_for=31, **kw)
    assert closed.close and closed.incomplete and "geometry gate" in closed.reason


def test_gaps_after_association_ended_close_with_the_finding():
    d = decide(quiet_for=10, quiet_period=10, count=4, numbers=[1, 2, 3, 4], expected=6,
               association_open=False)
    assert d.close and d.incomplete and "ImagesInAcquisition is 6" in d.reason


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def test_assembler_uses_ledger_evidence_and_association_state(tmp_path):
    clock = Clock()
    ledger = Ledger(tmp_path / "l.db", clock=clock)
    for n in (1, 2, 4):
        ledger.record_instance(sop_instance_uid=f"1.{n}", series_uid="9", study_uid="8",
                               sop_class_uid="1.2", relpath=f"objects/{n}", sha256="0", size=1,
                               calling_ae="CT", instance_number=n)
    open_assoc = {"9"}
    assembler = Assembler(ledger, 10, association_open=lambda uid: uid in open_assoc)
    clock.now += 11
    assert assembler.poll() == []  # gap and the scanner is still connected
    open_assoc.clear()
    (job_id,) = assembler.poll()
    assert ledger.job(job_id).series_uid == "9"
