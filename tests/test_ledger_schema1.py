"""A ledger written by the schema-1 release opens, migrates and delivers under this code.

``tests/fixtures/ledger_schema1.sql`` was made by
``tests/fixtures/make_ledger_schema1.py``: it runs the ledger module of commit
3955f83 (``oncoseg_node/jobqueue.py``, the last release without schema
versions, taken with ``git show``) on a fixed clock to build a ledger with a
job in every state (queued, running, held, delivering, sent, failed,
quarantined, skipped, superseded, discarded) and three pending deliveries,
then dumps it with ``sqlite3.Connection.iterdump()``. Loading the dump gives
exactly the file a hospital's node holds today (``user_version`` 0). The
pending deliveries are sent by the delivery scheduler, and by the daemon
itself started on that ledger, to a real DCMTK storescp.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pydicom
import pytest

from oncoseg_node.config import load_config
from oncoseg_node.delivery.scheduler import DeliveryScheduler
from oncoseg_node.ledger import DeliveryState, JobState, Ledger
from oncoseg_node.ledger.migrations import LATEST_VERSION
from tests.conftest import write_config
from tests.ctfactory import encode, series
from tests.daemon import wait_until
from tests.peers import free_port, storescp

DUMP = Path(__file__).parent / "fixtures" / "ledger_schema1.sql"
TABLES = ("instances", "series", "jobs", "deliveries")


def load_schema1(path: Path) -> dict[str, list[dict]]:
    """Create the schema-1 ledger at ``path``; returns its rows by table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as db:
        db.executescript(DUMP.read_text())
    return rows_of(path)


def rows_of(path: Path) -> dict[str, list[dict]]:
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    try:
        return {t: [dict(r) for r in db.execute(f"SELECT * FROM {t} ORDER BY rowid")]
                for t in TABLES}
    finally:
        db.close()


def test_schema1_ledger_migrates_with_every_row_kept(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    before = load_schema1(path)
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 0
    assert {r["state"] for r in before["jobs"]} == set(JobState)
    ledger = Ledger(path)
    assert ledger.schema_versions == (0, LATEST_VERSION)
    assert {j.state for j in ledger.jobs()} == set(JobState)
    assert len(ledger.deliveries(state=DeliveryState.PENDING)) == 3
    ledger.close()
    after = rows_of(path)
    for table in TABLES:
        assert len(after[table]) == len(before[table]) > 0, table
        for old, new in zip(before[table], after[table], strict=True):
            assert {k: new[k] for k in old} == old, table  # later columns may be added
    # opened again: already at the latest version, nothing runs twice
    again = Ledger(path)
    assert again.schema_versions == (LATEST_VERSION, LATEST_VERSION)
    again.close()


@pytest.mark.peers
def test_pending_deliveries_of_a_schema1_ledger_reach_a_real_storescp(tmp_path):
    port = free_port()
    fast = {"first_delay_s": 0.2, "max_delay_s": 1.0}
    cfg = load_config(write_config(tmp_path, destinations=[
        {"name": name, "ae_title": "TPS", "host": "127.0.0.1", "port": port, "timeout_s": 5,
         "retry": fast} for name in ("tps", "pacs")]))
    load_schema1(cfg.ledger_path)
    ledger = Ledger(cfg.ledger_path)
    pending = ledger.deliveries(state=DeliveryState.PENDING)
    expected = {d.sop_instance_uid for d in pending}
    for delivery in pending:  # the structure sets the old node had written
        ds = series(1)[0]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = delivery.sop_instance_uid
        path = cfg.state_dir / delivery.relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(ds))
    jobs = {d.job_id for d in pending}
    untouched = {j.id: j for j in ledger.jobs() if j.id not in jobs}
    scheduler = DeliveryScheduler(cfg, ledger, reconcile_interval_s=0.2)
    tps = tmp_path / "tps"
    with storescp(tps, port=port):
        scheduler.start()
        try:
            wait_until(lambda: all(ledger.job(j).state == JobState.SENT for j in jobs), 60,
                       "the migrated ledger's pending deliveries")
        finally:
            scheduler.stop()
    received = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                for f in tps.iterdir()}
    assert received == expected and len(expected) == 2
    assert all(d.state == DeliveryState.DELIVERED for d in ledger.deliveries()
               if d.job_id in jobs)
    assert {j.id: j for j in ledger.jobs() if j.id not in jobs} == untouched
    ledger.close()


@pytest.mark.peers
def test_the_daemon_started_on_a_schema1_ledger_delivers_its_pending_deliveries(tmp_path):
    from tests.daemon import Daemon

    with storescp(tmp_path / "tps") as tps_port:
        config = write_config(tmp_path, destinations=[
            {"name": name, "ae_title": "TPS", "host": "127.0.0.1", "port": tps_port,
             "timeout_s": 5} for name in ("tps", "pacs")])
        cfg = load_config(config)
        load_schema1(cfg.ledger_path)
        with sqlite3.connect(cfg.ledger_path) as db:
            pending = db.execute("SELECT job_id, sop_instance_uid, relpath FROM deliveries "
                                 "WHERE state = 'pending'").fetchall()
        for _job, uid, relpath in pending:
            ds = series(1)[0]
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
            (cfg.state_dir / relpath).parent.mkdir(parents=True, exist_ok=True)
            (cfg.state_dir / relpath).write_bytes(encode(ds))
        daemon = Daemon(config, 0, tmp_path / "daemon.log").start()
        try:
            sent = wait_until(
                lambda: {j["job"] for j in daemon.status() if j["state"] == JobState.SENT}
                >= {4, 5, 9} and daemon.status(), 60, f"the pending deliveries\n{daemon.log()}")
        finally:
            daemon.stop()
    received = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                for f in (tmp_path / "tps").iterdir()}
    assert received == {uid for _job, uid, _relpath in pending}
    by_id = {j["job"]: j for j in sent}
    assert {d["state"] for d in by_id[4]["deliveries"]} == {DeliveryState.DELIVERED}
    assert by_id[6]["state"] == JobState.FAILED  # its refused delivery is not retried
    assert by_id[10]["state"] == JobState.DISCARDED
    assert sqlite3.connect(cfg.ledger_path).execute("PRAGMA user_version").fetchone()[0] \
        == LATEST_VERSION
