"""Run the real daemon as a subprocess (``oncoseg-node run``) for end-to-end tests."""

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

from tests.peers import storescu, wait_for_port


class Daemon:
    running: set[Daemon] = set()  # started and not yet reaped: killed after each test

    def __init__(self, config_path: Path, port: int, log_path: Path) -> None:
        self.config_path = config_path
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> Daemon:
        log = self.log_path.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "oncoseg_node.cli", "run", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
        Daemon.running.add(self)
        try:
            wait_for_port(self.port, timeout)
        except TimeoutError:
            self.proc.kill()
            raise AssertionError(f"daemon did not listen:\n{self.log()}") from None
        return self

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
