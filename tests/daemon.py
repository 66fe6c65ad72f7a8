"""Run the real daemon as a subprocess (``oncoseg-node run``) for end-to-end tests.

A daemon started on port 0 (the default of ``write_config``) binds a port of
its own, and ``Daemon.port`` / ``Daemon.http_port`` are read back from its log
at each start; on a fixed port it counts as started only once its own process
listens there, never because something else does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.listeners import NotListening, wait_for_own_listener, wait_while_running
from tests.peers import storescu


class Daemon:
    running: set[Daemon] = set()  # started and not yet reaped: killed after each test

    def __init__(self, config_path: Path, port: int, log_path: Path) -> None:
        """``port``: the node's DICOM port in the config, 0 for one it picks at each start."""
        self.config_path = config_path
        self.configured_port = port
        self.port = port
        self.http_port: int | None = None  # read back at each start; None with HTTP off
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> Daemon:
        logged = self.log_path.stat().st_size if self.log_path.exists() else 0
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "oncoseg_node.cli", "run", "--config",
                 str(self.config_path)], stdout=log, stderr=subprocess.STDOUT, env=env,
            )
        Daemon.running.add(self)
        try:
            if not self.configured_port:
                self.port = self._wait_logged_port(logged, timeout)
            wait_for_own_listener(self.proc, self.port, timeout, "the node")
        except NotListening as error:
            self.kill()
            raise type(error)(f"daemon did not listen: {error}\n{self.log()}") from None
        self.http_port = self._logged_ports(logged).get("http_listening")
        return self

    def _logged_ports(self, logged: int) -> dict[str, int]:
        """The ports logged as bound (``listening``, ``http_listening``) past byte ``logged``
        of the log: the JSON records at info level, the node's defaults in a log file."""
        with self.log_path.open("rb") as log:
            log.seek(logged)
            lines = log.read().decode(errors="replace").splitlines(keepends=True)
        ports = {}
        for line in lines:
            if line.startswith("{") and line.endswith("\n"):  # whole records only
                record = json.loads(line)
                if record.get("event") in ("listening", "http_listening"):
                    ports[record["event"]] = int(record["port"])
        return ports

    def _wait_logged_port(self, logged: int, timeout: float) -> int:
        """The DICOM port a start on port 0 got, read back from its log."""
        assert self.proc is not None
        return wait_while_running(self.proc, lambda: self._logged_ports(logged).get("listening"),
                                  timeout, "the node")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    @classmethod
    def kill_leftovers(cls) -> None:
        """Kill daemons a failed test left running, so they cannot load the next test."""
        for daemon in list(cls.running):
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.kill()
        cls.running.clear()

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "oncoseg_node.cli", *args, "--config", str(self.config_path)],
            capture_output=True, text=True, timeout=60,
        )

    def status(self) -> list[dict[str, Any]]:
        proc = self.cli("status", "--json")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def phantom_files(directory: Path, slices: int = 96) -> list[Path]:
    """A realistic 512 x 512 series written to ``directory``: contouring it takes a while."""
    from oncoseg_node.commissioning.phantom import write_phantom

    directory.mkdir()
    write_phantom(directory, slices=slices, rows=512, columns=512)
    return sorted(directory.iterdir())


def tps_destination(tps_port: int, **extra: Any) -> dict[str, Any]:
    """The one destination of these tests: a storescp playing the planning system."""
    return {"name": "tps", "ae_title": "TPS", "host": "127.0.0.1", "port": tps_port, **extra}


def send_until_contouring(daemon: Daemon, files: list[Path]) -> None:
    """Send ``files`` by storescu and return once the daemon has started their job."""
    assert storescu(files, daemon.port).returncode == 0
    wait_until(lambda: '"job_started"' in daemon.log(), 60, "the job to start")
