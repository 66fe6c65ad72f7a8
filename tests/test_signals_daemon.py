"""Signals and systemd notification failures on the running daemon (a subprocess):
a second SIGTERM or SIGINT exits at once; a broken notify socket never stops the node."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import write_config
from tests.daemon import Daemon, phantom_files, send_until_contouring, tps_destination, wait_until
from tests.listeners import wait_for_own_listener
from tests.peers import free_port, storescp

pytestmark = pytest.mark.peers  # the daemon, as a subprocess


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_second_signal_exits_at_once_and_the_job_is_done_at_next_start(tmp_path, signum):
    tps = tmp_path / "tps"
    files = phantom_files(tmp_path / "phantom")
    with storescp(tps) as tps_port:
        config = write_config(
            tmp_path, series={"quiet_period_s": 1}, destinations=[tps_destination(tps_port)])
        node = Daemon(config, 0, tmp_path / "node.log").start()
        send_until_contouring(node, files)
        node.proc.send_signal(signum)
        wait_until(lambda: '"stopping"' in node.log(), 10, "the first signal seen",
                   interval=0.05)
        node.proc.send_signal(signum)
        second = time.monotonic()
        code = node.proc.wait(timeout=30)
        took = time.monotonic() - second
        forced = [json.loads(line) for line in node.log().splitlines()
                  if '"forced_exit"' in line]
        node.start()  # the job left running is requeued and delivered once
        try:
            (job,) = wait_until(lambda: [j for j in node.status() if j["state"] == "sent"],
                                180, f"the job sent after restart\n{node.log()[-2000:]}")
        finally:
            assert node.stop() == 0, node.log()
    print(f"second signal {signum}: exit {code} after {took:.2f} s")
    assert code == 130 and took < 5, (code, took)
    assert forced and forced[0]["signal"] == signum
    assert len(list(tps.iterdir())) == 1 and job["attempts"] <= 2


def test_notify_socket_failures_are_logged_once_and_never_stop_the_node(tmp_path):
    """NOTIFY_SOCKET names a socket that does not exist (systemd gone, a stale value):
    READY, every watchdog pet and STOPPING fail; the node runs and stops cleanly."""
    port = free_port()
    config = write_config(tmp_path, node={"port": port})
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "NOTIFY_SOCKET": str(tmp_path / "no-such-socket"), "WATCHDOG_USEC": "400000"}
    env.pop("WATCHDOG_PID", None)
    log_path = tmp_path / "node.log"
    proc = subprocess.Popen([sys.executable, "-m", "oncoseg_node.cli", "run", "--config",
                             str(config)], stdout=log_path.open("ab"), stderr=subprocess.STDOUT,
                            env=env)
    try:
        wait_for_own_listener(proc, port, 60, "the node")
        time.sleep(2)  # ten watchdog pets, each failing
        alive = proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = log_path.read_text()
    assert alive and code == 0, log
    assert log.count('"sd_notify_failed"') == 1, log
    assert '"stopped"' in log
