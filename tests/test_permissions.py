"""Patient data on disk is the node user's alone, whatever the umask it was started with."""

from __future__ import annotations

import os
import stat

import pytest

from oncoseg_node.durable import write_durably
from oncoseg_node.intake.spool import Spool
from oncoseg_node.ledger import JobState, Ledger
from tests.conftest import write_config
from tests.ctfactory import encode, series
from tests.daemon import Daemon, wait_until
from tests.peers import storescp, storescu


def open_to_others(root) -> list[str]:
    """Every file or folder under ``root`` (and root) that group or others may use."""
    found = []
    for path in [root, *root.rglob("*")]:
        mode = path.lstat().st_mode
        if stat.S_IMODE(mode) & 0o077:
            found.append(f"{path.relative_to(root.parent)} {stat.filemode(mode)}")
    return found


@pytest.mark.peers
def test_a_run_under_umask_022_leaves_nothing_readable_by_others(tmp_path):
    send = tmp_path / "send"
    send.mkdir()
    for ds in series(5):
        (send / f"{ds.InstanceNumber}.dcm").write_bytes(encode(ds))
    with storescp(tmp_path / "tps") as tps_port:
        config = write_config(tmp_path, destinations=[
            {"name": "tps", "ae_title": "TPS", "host": "127.0.0.1", "port": tps_port}])
        old = os.umask(0o022)  # as an operator's shell; the daemon inherits it
        try:
            daemon = Daemon(config, 0, tmp_path / "daemon.log").start()
        finally:
            os.umask(old)
        state = tmp_path / "state"
        try:
            assert storescu(send, daemon.port).returncode == 0
            ledger = Ledger(state / "ledger.sqlite3")
            wait_until(lambda: [j for j in ledger.jobs() if j.state == JobState.SENT], 60,
                       f"the job sent\n{daemon.log()}")
            assert (state / "ledger.sqlite3-wal").exists()
            running = open_to_others(state)
        finally:
            daemon.stop()
    assert list((state / "outbox").glob("*.dcm")) and list(
        (state / "spool" / "objects").rglob("*.dcm"))
    assert running == []
    assert open_to_others(state) == []


def test_ledger_spool_and_durable_writes_are_private_under_a_permissive_umask(tmp_path):
    old = os.umask(0o000)
    try:
        ledger = Ledger(tmp_path / "state" / "ledger.sqlite3")
        ledger.record_instance(sop_instance_uid="1", series_uid="2", study_uid="3",
                               sop_class_uid="1.2", relpath="objects/x", sha256="0", size=1,
                               calling_ae="CT")
        spool = Spool(tmp_path / "state" / "spool")
        spool.store(b"instance bytes")
        (tmp_path / "state" / "outbox").mkdir(mode=0o700)
        write_durably(tmp_path / "state" / "outbox" / "rs.dcm", b"structure set")
        assert open_to_others(tmp_path / "state") == []
        ledger.close()
    finally:
        os.umask(old)


def test_a_ledger_left_world_readable_is_made_private_at_open(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    Ledger(path).close()
    path.chmod(0o644)
    tmp_path.chmod(0o755)
    Ledger(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
