"""Shared fixtures: a node config written to disk and loaded the real way."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from oncoseg_node.config import Config, load_config
from tests.daemon import Daemon

REPO = Path(__file__).resolve().parents[1]


def write_config(directory: Path, **overrides: Any) -> Path:
    """Write a node config (embedded default + overrides) and return its path."""
    raw = yaml.safe_load((REPO / "config" / "oncoseg-node.yaml").read_text())
    raw["protocols"] = str(REPO / "config" / "protocols.yaml")
    raw["state_dir"] = str(directory / "state")
    raw["node"]["port"] = 0
    raw["node"]["min_free_disk_mb"] = 1
    raw["http"]["port"] = 0
    raw["series"]["quiet_period_s"] = 1
    raw["destinations"] = []
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    path = directory / "oncoseg-node.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def make_config(tmp_path: Path):
    def factory(**overrides: Any) -> Config:
        return load_config(write_config(tmp_path, **overrides))

    return factory


@pytest.fixture(autouse=True)
def no_daemon_outlives_its_test():
    yield
    Daemon.kill_leftovers()


# What makes a test a ``peers`` test: a program outside Python, or a listener.
PEER_PROGRAMS = frozenset({
    "storescu", "storescp", "echoscu", "dcmcjpeg", "dcmcjpls", "dcmdjpeg", "dciodvfy",
    "dcentvfy", "Orthanc", "chromium", "chromium-browser", "systemd-analyze",
})


class UnmarkedPeer(AssertionError):
    """A test not marked ``peers`` started a peer program, the daemon or a listener."""


@pytest.fixture(autouse=True)
def peers_are_marked(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """When peers are deselected (``-m "not peers"``), a test that needs one fails loudly.

    So the fast run stays fast and runs where no peer is installed, and a new
    test that forgot its marker is found, not silently slow.
    """
    if "not peers" not in (request.config.option.markexpr or ""):
        return
    if request.node.get_closest_marker("peers") is not None:
        return
    test = request.node.nodeid

    def refuse_listen(self: socket.socket, *args: Any) -> None:
        raise UnmarkedPeer(f"{test} opens a network listener: mark it peers")

    execute_child = subprocess.Popen._execute_child  # type: ignore[attr-defined]

    def checked_execute_child(self: subprocess.Popen, args: Any, *rest: Any) -> Any:
        argv = [str(a) for a in args] if isinstance(args, (list, tuple)) else [str(args)]
        program = Path(argv[0]).name
        if program in PEER_PROGRAMS or argv[1:4] == ["-m", "oncoseg_node.cli", "run"]:
            raise UnmarkedPeer(f"{test} starts {program} {' '.join(argv[1:4])}: mark it peers")
        return execute_child(self, args, *rest)

    monkeypatch.setattr(socket.socket, "listen", refuse_listen)
    monkeypatch.setattr(subprocess.Popen, "_execute_child", checked_execute_child)
