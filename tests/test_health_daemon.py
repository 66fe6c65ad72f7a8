"""``/healthz`` on a running daemon: every part that can fail is reported, and the
protocol watcher survives whatever is written to the protocols file."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time

import pytest

from oncoseg_node.intake.assembly import Assembler
from oncoseg_node.ledger import Ledger
from tests.conftest import REPO, write_config
from tests.daemon import Daemon, wait_until
from tests.test_http_daemon import get

pytestmark = pytest.mark.peers


def healthz(port: int) -> tuple[int, dict]:
    code, body = get(port, "/healthz")
    return code, json.loads(body)


def events(daemon: Daemon, name: str) -> list[dict]:
    return [json.loads(line) for line in daemon.log().splitlines()
            if line.startswith("{") and f'"{name}"' in line]


def test_protocol_watcher_survives_garbage_and_applies_the_next_valid_edit(tmp_path):
    protocols = tmp_path / "protocols.yaml"
    shutil.copy(REPO / "config" / "protocols.yaml", protocols)
    config = write_config(tmp_path, protocols=str(protocols))
    node = Daemon(config, 0, tmp_path / "node.log").start()
    http_port = node.http_port
    try:
        wait_until(lambda: healthz(http_port)[0] == 200, 30, "healthy at start")
        good = protocols.read_bytes()
        bad_contents = [
            b"\xff\xfe\x00\x81protocols: [\x80\x80",    # not UTF-8
            bytes(range(256)) * 4,                     # binary
            "\u0000\u0001: [\t".encode(),              # valid UTF-8, no YAML
            b"- just\n- a list\n",                     # YAML, not a mapping
        ]
        for i, content in enumerate(bad_contents, start=1):
            protocols.write_bytes(content)
            code, body = wait_until(lambda: (r := healthz(http_port))[0] == 503 and r, 15,
                                    f"503 after bad content {i}\n{node.log()[-3000:]}")
            assert body["checks"]["protocols_file"] is False
            assert body["checks"]["protocol_watcher"] is True
            assert "protocols_file" in body["detail"]
            wait_until(lambda n=i: len(events(node, "protocols_reload_rejected")) >= n, 15,
                       f"rejection {i} logged")
            protocols.write_bytes(good)  # back to good: healthy again, same version
            wait_until(lambda: healthz(http_port)[0] == 200, 15, f"healthy after {i}")
        protocols.unlink()
        protocols.mkdir()  # a directory where the file was
        wait_until(lambda: healthz(http_port)[0] == 503, 15, "503 with a directory")
        protocols.rmdir()
        edited = good.replace(b"priority: 0", b"priority: 1", 1)
        assert edited != good
        protocols.write_bytes(edited)
        wait_until(lambda: events(node, "protocols_reloaded"), 15,
                   f"the valid edit applied\n{node.log()[-3000:]}")
        code, body = healthz(http_port)
    finally:
        assert node.stop() == 0, node.log()
    assert code == 200, body
    (reloaded,) = events(node, "protocols_reloaded")
    assert reloaded["version"] == hashlib.sha256(edited).hexdigest()[:12]
    assert len(events(node, "protocols_reload_rejected")) >= len(bad_contents) + 1


def test_assembler_failing_its_polls_counts_as_failing(tmp_path):
    """A ledger the assembler cannot read (here: closed under it) fails every poll."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    assembler = Assembler(ledger, quiet_period_s=1)
    assembler.listening()  # as the service does once the port is bound
    stop = threading.Event()
    loop = threading.Thread(target=assembler.run, args=(stop, 0.02), daemon=True)
    loop.start()
    try:
        time.sleep(0.2)  # several good polls
        assert assembler.healthy() and assembler.failures_in_a_row == 0
        ledger.close()
        wait_until(lambda: not assembler.healthy(), 5, "failing", interval=0.02)
        assert "closed" in (assembler.last_failure or "")
    finally:
        stop.set()
        loop.join(timeout=5)


def test_disk_below_the_threshold_is_503_naming_the_free_space(tmp_path):
    config = write_config(tmp_path, node={"min_free_disk_mb": 2**40})
    node = Daemon(config, 0, tmp_path / "node.log").start()
    http_port = node.http_port
    try:
        code, body = wait_until(lambda: (r := healthz(http_port))[0] == 503 and r, 30, "503")
    finally:
        assert node.stop() == 0, node.log()
    assert body["checks"]["disk"] is False
    assert [k for k, ok in body["checks"].items() if not ok] == ["disk"]
    assert "MB free, node.min_free_disk_mb is 1099511627776" in body["detail"]["disk"]
