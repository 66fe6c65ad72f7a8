"""The systemd unit: ``systemd-analyze verify`` is clean, and it says what the service needs."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from oncoseg_node.cli import build_parser, cmd_run
from oncoseg_node.config import DestinationConfig
from oncoseg_node.intake.transport import FD_RESERVE
from oncoseg_node.ops.service import SHUTDOWN_DEADLINE_S
from tests.conftest import REPO
from tests.peers import require

pytestmark = pytest.mark.peers

UNIT = REPO / "systemd" / "oncoseg-node.service"
DROP_IN = REPO / "systemd" / "drop-in-example.conf"
SYSUSERS = REPO / "systemd" / "oncoseg-node.sysusers"


def directives(path: Path) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file, in order (keys may repeat)."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def seconds(value: str) -> float:
    assert value.endswith("s") and value[:-1].isdigit(), f"write {value!r} as plain seconds"
    return float(value[:-1])


@pytest.fixture
def root(tmp_path) -> Path:
    """A root directory holding the system's units, ours, and the program it runs.

    ``--root`` keeps verify off the host's /etc while it still resolves the
    targets ours depends on and checks that ExecStart is an executable file.
    """
    systemd_units = next(p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
                         if p.is_dir())
    root = tmp_path / "root"
    shutil.copytree(systemd_units, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system" / UNIT.name)
    program = Path(shlex.split(directives(UNIT)["ExecStart"][0])[0])
    stub = root / program.relative_to("/")
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\n")  # stands in for the installed entry point
    stub.chmod(0o755)
    return root


def verify(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([require("systemd-analyze"), "verify", f"--root={root}", "--man=no",
                           UNIT.name], capture_output=True, text=True, timeout=60)


def test_systemd_analyze_verify_is_clean(root):
    proc = verify(root)
    # verify exits 0 on unknown keys and unparsable values (it only warns), so
    # a clean unit is one with no output at all.
    assert proc.returncode == 0 and (proc.stdout + proc.stderr).strip() == "", proc.stderr


def test_verify_would_catch_a_broken_unit(root):
    unit = root / "etc/systemd/system" / UNIT.name
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystem=strcit"))
    assert "strcit" in verify(root).stderr


def test_drop_in_example_is_clean_too(root):
    drop_ins = root / "etc/systemd/system" / f"{UNIT.name}.d"
    drop_ins.mkdir()
    shutil.copy(DROP_IN, drop_ins / "local.conf")
    proc = verify(root)
    assert proc.returncode == 0 and (proc.stdout + proc.stderr).strip() == "", proc.stderr


def test_unit_runs_the_daemon_as_a_notify_service_with_a_watchdog():
    unit = directives(UNIT)
    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["main"]
    assert seconds(unit["WatchdogSec"][0]) >= 10
    assert unit["Restart"] == ["on-failure"]
    assert unit["User"] == ["oncoseg"] and "DynamicUser" not in unit
    assert unit["StateDirectory"] == ["oncoseg-node oncoseg-node/incoming"]
    # temporary files on the state disk, not a RAM-backed /tmp
    assert "TMPDIR=/var/lib/oncoseg-node/incoming" in " ".join(unit["Environment"])
    args = build_parser().parse_args(shlex.split(unit["ExecStart"][0])[1:])
    assert args.func is cmd_run
    assert str(args.config) == "/etc/oncoseg-node/oncoseg-node.yaml"


def test_stop_timeout_outlasts_the_shutdown_deadline():
    unit = directives(UNIT)
    destination_timeout = DestinationConfig("tps", "TPS", "127.0.0.1", 104).timeout_s
    assert seconds(unit["TimeoutStopSec"][0]) > SHUTDOWN_DEADLINE_S + destination_timeout
    assert unit["KillMode"] == ["mixed"]  # SIGTERM to the daemon, not to its helpers first


def test_descriptor_limit_leaves_room_for_hostile_connections_and_the_reserve():
    unit = directives(UNIT)
    (limit,) = unit["LimitNOFILE"]
    # 250 half-open connections, every association slot and the reserve the
    # listener keeps for the ledger and spool must fit with room to spare.
    assert limit.isdigit() and int(limit) >= 4 * (250 + FD_RESERVE)


def test_unit_is_hardened_but_keeps_the_gpu():
    unit = directives(UNIT)
    assert unit["NoNewPrivileges"] == ["yes"]
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["PrivateTmp"] == ["yes"]
    assert unit["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert "PrivateDevices" not in unit  # it would hide /dev/nvidia*
    assert unit["DevicePolicy"] == ["closed"]
    assert unit["DeviceAllow"] == ["char-nvidia* rw"]


def test_sysusers_file_creates_the_service_user(tmp_path):
    (tmp_path / "etc").mkdir()
    proc = subprocess.run([require("systemd-sysusers"), f"--root={tmp_path}", str(SYSUSERS)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    user = next(line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()
                if line.startswith("oncoseg:"))
    assert user[5] == "/var/lib/oncoseg-node" and user[6] == "/usr/sbin/nologin"
