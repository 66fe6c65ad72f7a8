"""Logs: JSON lines for journald, readable lines on a terminal, job context and audit records."""

from __future__ import annotations

import io
import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest
import structlog

from oncoseg_node.config import LoggingConfig
from oncoseg_node.ops.logs import configure_logging
from tests.conftest import write_config
from tests.ctfactory import series
from tests.daemon import Daemon, wait_until
from tests.peers import free_port, storescp, storescu


@pytest.fixture(autouse=True)
def restore_structlog():
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def drain(leader: int) -> str:
    """Everything written to a pseudo-terminal whose other end is closed."""
    data = b""
    while select.select([leader], [], [], 2.0)[0]:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the writer's end is closed and all was read
            break
        if not chunk:
            break
        data += chunk
    os.close(leader)
    return data.decode(errors="replace")


def emit(config: LoggingConfig, stream) -> None:
    configure_logging(config, stream)
    log = structlog.get_logger("oncoseg_node.test").bind(job_id=7, series_uid="1.2.3",
                                                        calling_ae="CTSIM")
    log.info("job_started", attempt=1)
    log.debug("hidden_at_info")


def test_json_lines_when_not_on_a_terminal():
    stream = io.StringIO()
    emit(LoggingConfig(format="auto", level="info"), stream)
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["event"] == "job_started" and record["level"] == "info"
    assert (record["job_id"], record["series_uid"], record["calling_ae"]) == (7, "1.2.3", "CTSIM")
    assert record["timestamp"].endswith("Z")


def test_readable_lines_on_a_terminal():
    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as terminal:
        emit(LoggingConfig(format="auto", level="debug"), terminal)
        terminal.flush()
    lines = drain(leader).splitlines()
    assert len(lines) == 2 and "job_started" in lines[0] and "hidden_at_info" in lines[1]
    assert "job_id=7" in lines[0] and "series_uid=1.2.3" in lines[0]
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[0])


def test_format_can_be_forced_either_way():
    stream = io.StringIO()
    emit(LoggingConfig(format="console", level="info"), stream)
    assert "job_id=7" in stream.getvalue()
    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as terminal:
        emit(LoggingConfig(format="json", level="info"), terminal)
    assert json.loads(drain(leader).splitlines()[0])["job_id"] == 7


def test_contextvars_are_merged_into_every_line():
    stream = io.StringIO()
    configure_logging(LoggingConfig(format="json"), stream)
    with structlog.contextvars.bound_contextvars(job_id=3, series_uid="9.8", calling_ae="SIM"):
        structlog.get_logger("x").info("inner")
    assert json.loads(stream.getvalue())["series_uid"] == "9.8"


def test_daemon_logs_job_context_and_audit_records(tmp_path):
    port = free_port()
    with storescp(tmp_path / "tps") as tps_port:
        config = write_config(
            tmp_path, node={"port": port}, series={"quiet_period_s": 1},
            destinations=[{"name": "tps", "ae_title": "TPS", "host": "127.0.0.1",
                           "port": tps_port, "retry": {"first_delay_s": 1, "max_delay_s": 5}}])
        daemon = Daemon(config, port, tmp_path / "daemon.log").start()
        try:
            datasets = series(6)
            files = []
            for i, ds in enumerate(datasets):
                files.append(tmp_path / f"{i}.dcm")
                ds.save_as(files[-1], enforce_file_format=True)
            assert storescu(files, port, calling="CTSIM").returncode == 0
            wait_until(lambda: "rtstruct_delivered" in daemon.log(), 120,
                       f"the delivery\n{daemon.log()}")
        finally:
            assert daemon.stop() == 0, daemon.log()
    records = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
    series_uid = str(datasets[0].SeriesInstanceUID)
    about_jobs = [r for r in records if "job_id" in r]
    assert {"series_received", "job_started", "job_contoured", "rtstruct_delivered"} <= {
        r["event"] for r in about_jobs}
    for record in about_jobs:
        assert record["series_uid"] == series_uid, record
        assert record["calling_ae"] == "CTSIM", record
    audit = {r["event"]: r for r in records if r.get("audit")}
    assert audit["series_received"]["instances"] == 6
    assert audit["rtstruct_delivered"]["destination"] == "tps"
    assert audit["rtstruct_delivered"]["sop_instance_uid"]


def test_daemon_on_a_terminal_writes_readable_lines(tmp_path):
    port = free_port()
    config = write_config(tmp_path, node={"port": port})
    leader, follower = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "oncoseg_node.cli", "run", "--config", str(config)],
        stdout=follower, stderr=follower, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    os.close(follower)
    output = b""
    try:
        deadline = time.monotonic() + 60
        while b"started" not in output and time.monotonic() < deadline:
            if select.select([leader], [], [], 0.5)[0]:
                output += os.read(leader, 65536)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
        while select.select([leader], [], [], 0.2)[0]:
            try:
                output += os.read(leader, 65536)
            except OSError:  # the terminal's other end closed
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
    text = output.decode(errors="replace")
    lines = [line for line in text.splitlines() if "listening" in line and "ae_title" in line]
    assert lines and not lines[0].lstrip().startswith("{"), text
    assert f"port={port}" in lines[0]
