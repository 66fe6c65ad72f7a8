"""Logs: JSON lines for journald, readable lines on a terminal, job context and audit records."""

from __future__ import annotations

import io
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime

import pytest
import structlog
from apscheduler.schedulers.background import BackgroundScheduler
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage

from oncoseg_node.config import LoggingConfig
from oncoseg_node.intake.handlers import StoreHandlers
from oncoseg_node.intake.spool import Spool
from oncoseg_node.intake.transport import Receiver
from oncoseg_node.ledger import Ledger
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


@pytest.fixture
def restore_stdlib_logging():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, sys.excepthook, threading.excepthook)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    sys.excepthook, threading.excepthook = saved[2], saved[3]
    logging.captureWarnings(False)


def json_lines(text: str) -> list[dict]:
    """Every line as a JSON object; fails on any line that is not one."""
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line!r}\n{text}")
    return records


@pytest.mark.peers
def test_library_records_share_the_one_json_stream(make_config, restore_stdlib_logging):
    """pynetdicom's records from a real association and apscheduler's from a real job
    come out as the same JSON lines as the node's own, on the same stream."""
    stream = io.StringIO()
    configure_logging(LoggingConfig(format="json", level="info"), stream)
    cfg = make_config()
    receiver = Receiver(cfg.node, StoreHandlers(cfg.node, cfg.series, Spool(cfg.spool_dir),
                                                Ledger(cfg.ledger_path)))
    receiver.start()
    try:
        scu = AE(ae_title="CTSIM")
        scu.add_requested_context(MRImageStorage)  # the node stores CT only
        assert not scu.associate("127.0.0.1", receiver.port, ae_title="ONCOSEG").is_established
    finally:
        receiver.stop_accepting()
    ran = threading.Event()

    def broken_job() -> None:
        ran.set()
        raise RuntimeError("job broke")

    scheduler = BackgroundScheduler(timezone=UTC)
    scheduler.add_job(broken_job, "date", run_date=datetime.now(UTC))
    scheduler.start()
    try:
        assert ran.wait(10)
        wait_until(lambda: not scheduler.get_jobs(), 10, "the date job to be done")
    finally:
        scheduler.shutdown(wait=True)
    records = json_lines(stream.getvalue())
    by_logger = {r["logger"].split(".")[0]: r for r in records if r["level"] != "info"}
    assert by_logger["pynetdicom"]["event"] == "No accepted presentation contexts"
    assert by_logger["pynetdicom"]["level"] == "error"
    job = by_logger["apscheduler"]
    assert job["level"] == "error" and "raised an exception" in job["event"]
    assert "RuntimeError: job broke" in job["exception"]  # the traceback inside the line
    assert any(r["event"] == "listening" for r in records)  # and our own, alike
    assert all(r["timestamp"].endswith("Z") for r in records)


def test_warnings_and_a_crash_are_json_lines_too(tmp_path):
    """In a process of its own: the test runner would otherwise catch both itself."""
    script = (
        "import warnings\n"
        "from oncoseg_node.config import LoggingConfig\n"
        "from oncoseg_node.ops.logs import configure_logging\n"
        "configure_logging(LoggingConfig(format='json'))\n"
        "warnings.warn('a library warning', UserWarning)\n"
        "raise SystemError('main broke')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 1 and proc.stderr == "", proc.stderr
    warned, crashed = json_lines(proc.stdout)
    assert warned["logger"] == "py.warnings" and "a library warning" in warned["event"]
    assert crashed["event"] == "uncaught_exception" and crashed["level"] == "critical"
    assert "SystemError: main broke" in crashed["exception"]


def test_uncaught_thread_exception_is_a_json_line(restore_stdlib_logging):
    stream = io.StringIO()
    configure_logging(LoggingConfig(format="json", level="info"), stream)

    def crash() -> None:
        raise ValueError("thread broke")

    thread = threading.Thread(target=crash, name="crasher")
    thread.start()
    thread.join()
    (record,) = json_lines(stream.getvalue())
    assert record["event"] == "uncaught_exception_in_thread" and record["thread"] == "crasher"
    assert "ValueError: thread broke" in record["exception"]


@pytest.mark.peers
def test_daemon_logs_job_context_and_audit_records(tmp_path):
    with storescp(tmp_path / "tps") as tps_port:
        config = write_config(
            tmp_path, series={"quiet_period_s": 1},
            destinations=[{"name": "tps", "ae_title": "TPS", "host": "127.0.0.1",
                           "port": tps_port, "retry": {"first_delay_s": 1, "max_delay_s": 5}}])
        daemon = Daemon(config, 0, tmp_path / "daemon.log").start()
        try:
            datasets = series(6)
            files = []
            for i, ds in enumerate(datasets):
                files.append(tmp_path / f"{i}.dcm")
                ds.save_as(files[-1], enforce_file_format=True)
            assert storescu(files, daemon.port, calling="CTSIM").returncode == 0
            wait_until(lambda: "rtstruct_delivered" in daemon.log(), 120,
                       f"the delivery\n{daemon.log()}")
        finally:
            assert daemon.stop() == 0, daemon.log()
    records = json_lines(daemon.log())  # stdout and stderr: nothing but JSON lines
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


@pytest.mark.peers
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
