"""A damaged ledger stops the node with one clear line naming the file and what to do."""

from __future__ import annotations

import subprocess
import sys

import pytest

from oncoseg_node.errors import LedgerError
from oncoseg_node.intake.spool import Spool
from oncoseg_node.ledger import Ledger
from tests.conftest import write_config


def filled_ledger(path, count: int = 400) -> None:
    ledger = Ledger(path)
    for i in range(count):
        ledger.record_instance(sop_instance_uid=f"1.2.{i}", series_uid=f"1.3.{i % 7}",
                               study_uid="1.4", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                               relpath=f"objects/{i:02x}/{i:032x}.dcm", sha256="ab" * 32,
                               size=1000, calling_ae="CTSIM", description="x" * 40)
    ledger.connection.query("PRAGMA wal_checkpoint(TRUNCATE)")  # all in the main file
    ledger.close()


def damage(path, offset: int, length: int = 64) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(b"\xa5" * length)


def test_damaged_header_is_a_clear_ledger_error(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    filled_ledger(path)
    damage(path, 0, 16)
    with pytest.raises(LedgerError) as caught:
        Ledger(path)
    message = str(caught.value)
    assert str(path) in message and "damaged" in message and "move" in message
    assert "\n" not in message


def test_damaged_pages_are_found_by_the_check_at_open(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    filled_ledger(path)
    page = 4096
    damage(path, 3 * page + 8, 2000)  # inside a table page, header untouched
    with pytest.raises(LedgerError, match="damaged"):
        Ledger(path)


@pytest.mark.peers
def test_run_on_a_damaged_ledger_prints_one_line_and_exits_non_zero(tmp_path):
    config = write_config(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    filled_ledger(state / "ledger.sqlite3")
    damage(state / "ledger.sqlite3", 0, 16)
    acknowledged = Spool(state / "spool").store(b"an instance the scanner was told is stored")
    for command in (["run"], ["status"]):
        proc = subprocess.run([sys.executable, "-m", "oncoseg_node.cli", *command,
                               "--config", str(config)],
                              capture_output=True, text=True, timeout=60)
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
        assert proc.returncode != 0, command
        assert len(lines) == 1, (command, lines)
        assert str(state / "ledger.sqlite3") in lines[0] and "damaged" in lines[0]
        assert "Traceback" not in proc.stderr
    assert (state / "spool" / acknowledged.relpath).read_bytes().startswith(b"an instance")
