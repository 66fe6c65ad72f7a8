"""A lost, emptied or rolled-back ledger never costs an acknowledged instance.

Through the real daemon: a series is received (and, except in the WAL case,
contoured and delivered to a DCMTK storescp); then the ledger is deleted,
truncated to zero bytes, or its WAL damaged after ``kill -9``. The spool
files are aged past every grace period so that a retention pass that trusted
a missing row would delete them. After the restart every spooled file is
still there, registered again from its header, and the series is contoured
and delivered once.
"""

from __future__ import annotations

import os
import time

import pydicom
import pytest

from oncoseg_node.ledger import JobState, Ledger
from tests.conftest import write_config
from tests.ctfactory import encode, series
from tests.daemon import Daemon, wait_until
from tests.peers import storescp, storescu

pytestmark = pytest.mark.peers


def spooled(state) -> set[str]:
    spool = state / "spool"
    return {str(p.relative_to(spool)) for p in (spool / "objects").rglob("*.dcm")}


def age(state, seconds: float) -> None:
    then = time.time() - seconds
    for path in (state / "spool" / "objects").rglob("*.dcm"):
        os.utime(path, (then, then))


@pytest.mark.parametrize("loss", ["deleted", "emptied", "wal_damaged"])
def test_a_lost_ledger_keeps_every_file_and_contours_the_series_once(tmp_path, loss):
    send = tmp_path / "send"
    send.mkdir()
    datasets = series(6)
    for ds in datasets:
        (send / f"{ds.InstanceNumber}.dcm").write_bytes(encode(ds))
    series_uid = str(datasets[0].SeriesInstanceUID)
    state = tmp_path / "state"
    ledger_path = state / "ledger.sqlite3"
    with storescp(tmp_path / "tps") as tps_port:
        config = write_config(tmp_path,
                              series={"quiet_period_s": 3 if loss == "wal_damaged" else 1,
                                      "interrupted_wait_s": 4},
                              destinations=[{"name": "tps", "ae_title": "TPS",
                                             "host": "127.0.0.1", "port": tps_port}])
        daemon = Daemon(config, 0, tmp_path / "daemon.log").start()
        assert storescu(send, daemon.port).returncode == 0
        if loss == "wal_damaged":
            daemon.kill()  # inside the quiet period: the rows are only in the WAL
            wal = ledger_path.with_name(ledger_path.name + "-wal")
            assert wal.stat().st_size > 0
            with wal.open("r+b") as f:
                f.write(b"\0" * 32)  # the WAL header: SQLite discards every frame
        else:
            first = Ledger(ledger_path)
            wait_until(lambda: any(j.state == JobState.SENT for j in first.jobs()),
                       60, f"the first delivery\n{daemon.log()}")
            first.close()  # the last connection closing removes the WAL
            daemon.stop()
            assert not ledger_path.with_name(ledger_path.name + "-wal").exists()
            if loss == "deleted":
                for name in ("", "-wal", "-shm"):
                    ledger_path.with_name(ledger_path.name + name).unlink(missing_ok=True)
            else:
                ledger_path.write_bytes(b"")
        files = spooled(state)
        assert len(files) == len(datasets)
        age(state, 100 * 86400)  # older than retention.max_age_days and any orphan grace
        delivered_before = len(list((tmp_path / "tps").iterdir()))
        daemon.start()
        try:
            ledger = Ledger(ledger_path)
            wait_until(lambda: [j for j in ledger.jobs_of_series(series_uid)
                                if j.state == JobState.SENT], 90,
                       f"the series contoured after the restart\n{daemon.log()}")
            time.sleep(3)  # a second job, or a retention pass, would act by now
            assert spooled(state) == files
            jobs = ledger.jobs_of_series(series_uid)
            instances = ledger.series_instances(series_uid)
            ledger.close()
        finally:
            daemon.stop()
    assert len(jobs) == 1 and jobs[0].attempts == 1
    assert sorted(instances) == sorted(files)
    received = sorted((tmp_path / "tps").iterdir())
    assert len(received) == delivered_before + 1
    rs = pydicom.dcmread(received[-1], stop_before_pixels=True)
    referenced = rs.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0] \
        .RTReferencedSeriesSequence[0].SeriesInstanceUID
    assert referenced == series_uid
