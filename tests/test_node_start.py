"""Starting the node safely: one node per state directory, a failed start changes no job,
an operator's retry is sent at once. The daemon runs as a subprocess; DCMTK storescu
plays the scanner and storescp the planning system."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from datetime import datetime

import pytest

from oncoseg_node.cli import EXIT_START_FAILED
from oncoseg_node.ledger import DeliveryState, JobState
from tests.conftest import write_config
from tests.ctfactory import encode, series
from tests.daemon import Daemon, phantom_files, send_until_contouring, tps_destination, wait_until
from tests.peers import free_port, storescp, storescu
from tests.test_systemd import UNIT, directives

pytestmark = pytest.mark.peers


def series_files(directory, count: int = 24):
    directory.mkdir()
    paths = []
    for i, ds in enumerate(series(count)):
        path = directory / f"ct{i:03d}.dcm"
        path.write_bytes(encode(ds))
        paths.append(path)
    return paths


def run_node(config, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oncoseg_node.cli", "run", "--config",
                           str(config)], capture_output=True, text=True, timeout=timeout)


def job_rows(daemon: Daemon) -> list[tuple]:
    return [(j["job"], j["state"], j["attempts"],
             tuple((d["state"], d["attempts"]) for d in j["deliveries"]))
            for j in daemon.status()]


def test_second_node_on_the_same_state_dir_is_refused_and_the_first_job_is_untouched(
        tmp_path):
    tps = tmp_path / "tps"
    files = phantom_files(tmp_path / "phantom")
    with storescp(tps) as tps_port:
        config = write_config(
            tmp_path, series={"quiet_period_s": 1}, destinations=[tps_destination(tps_port)])
        first = Daemon(config, 0, tmp_path / "first.log").start()
        try:
            send_until_contouring(first, files)
            before = job_rows(first)
            started = time.monotonic()
            second = run_node(config)
            took = time.monotonic() - started
            assert job_rows(first) == before
            wait_until(lambda: list(tps.iterdir()) if tps.exists() else [], 120,
                       f"the RTSTRUCT\n{first.log()}")
            (job,) = wait_until(
                lambda: [j for j in first.status() if j["state"] == JobState.SENT], 30,
                "the job sent")
            time.sleep(2)  # a few reconcile passes: nothing sent twice
        finally:
            assert first.stop() == 0, first.log()
    assert second.returncode == EXIT_START_FAILED, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert str(tmp_path / "state") in lines[0] and f"PID {first.proc.pid}" in lines[0]
    print(f"second node refused after {took:.2f} s: {lines[0]}")
    assert took < 2, f"refused after {took:.2f} s"
    assert job["attempts"] == 1 and len(list(tps.iterdir())) == 1
    assert '"requeued_jobs"' not in second.stdout + second.stderr


def test_port_taken_four_starts_change_no_job_and_exit_with_a_no_restart_code(tmp_path):
    port = free_port()
    tps = tmp_path / "tps"
    files = phantom_files(tmp_path / "phantom")
    with storescp(tps) as tps_port:
        config = write_config(
            tmp_path, node={"port": port, "host": "127.0.0.1"}, series={"quiet_period_s": 1},
            destinations=[tps_destination(tps_port)])
        node = Daemon(config, port, tmp_path / "node.log").start()
        send_until_contouring(node, files)
        node.kill()  # a crash mid-job: the job stays running with one attempt
        before = job_rows(node)
        assert [r[1:3] for r in before] == [(JobState.RUNNING, 1)]

        blocker = socket.socket()
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        try:
            results = [run_node(config) for _ in range(4)]  # what Restart=on-failure does
        finally:
            blocker.close()
        assert job_rows(node) == before
        print(f"4 starts with the port taken: exit {[r.returncode for r in results]}, jobs "
              f"{before} unchanged; {results[0].stderr.strip()}")
        no_restart = directives(UNIT)["RestartPreventExitStatus"][0].split()
        for result in results:
            assert result.returncode == EXIT_START_FAILED, result.stderr
            assert str(result.returncode) in no_restart
            assert f"127.0.0.1:{port}" in result.stderr and "DICOM" in result.stderr

        node.start()  # port free again: the interrupted job runs once more and is sent
        try:
            (job,) = wait_until(
                lambda: [j for j in node.status() if j["state"] == JobState.SENT], 180,
                f"the job sent\n{node.log()}")
        finally:
            assert node.stop() == 0, node.log()
    assert job["attempts"] == 2 and len(list(tps.iterdir())) == 1


def test_retry_during_a_15_minute_backoff_delivers_within_5_s(tmp_path):
    tps_port = free_port()  # the planning system starts later, on this port
    tps = tmp_path / "tps"
    config = write_config(
        tmp_path, series={"quiet_period_s": 1},
        destinations=[{"name": "tps", "ae_title": "TPS", "host": "127.0.0.1", "port": tps_port,
                       "timeout_s": 5, "retry": {"first_delay_s": 900, "max_delay_s": 900}}])
    node = Daemon(config, 0, tmp_path / "node.log").start()
    try:
        assert storescu(series_files(tmp_path / "ct"), node.port).returncode == 0
        # The planning system is down: the first attempt fails, the next is 15 minutes away.
        (job,) = wait_until(
            lambda: [j for j in node.status() if j["deliveries"]
                     and j["deliveries"][0]["attempts"] == 1], 120,
            f"a failed first attempt\n{node.log()}")
        assert job["deliveries"][0]["state"] == DeliveryState.PENDING
        next_attempt = datetime.fromisoformat(job["deliveries"][0]["next_attempt_at"])
        assert next_attempt.timestamp() > time.time() + 800
        time.sleep(2.5)  # reconcile passes: the 15-minute timer is set
        with storescp(tps, port=tps_port):
            asked = time.monotonic()  # from the moment the command starts
            retry = node.cli("retry", str(job["job"]))
            assert retry.returncode == 0, retry.stderr
            wait_until(lambda: tps.exists() and list(tps.iterdir()), 10,
                       f"the retried delivery\n{node.log()}", interval=0.05)
            took = time.monotonic() - asked
            wait_until(lambda: node.status()[0]["state"] == JobState.SENT, 10, "the job sent")
    finally:
        assert node.stop() == 0, node.log()
    print(f"retried delivery at the TPS {took:.2f} s after the command: {retry.stdout.strip()}")
    assert took < 5, f"delivered {took:.1f} s after the command"
    assert f"PID {node.proc.pid}" in retry.stdout
    assert len(list(tps.iterdir())) == 1
    rescheduled = [json.loads(line) for line in node.log().splitlines()
                   if '"delivery_rescheduled"' in line]
    assert rescheduled and rescheduled[0]["in_s"] == 0
