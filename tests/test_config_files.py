"""Config files as an operator meets them: one check-config run for both files, problems
with file and line, the packaged defaults, ``init``, and nothing on disk before the
config is valid. The CLI runs as a subprocess."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from oncoseg_node.config import DEFAULT_CONFIG, DEFAULT_PROTOCOLS, default_state_dir, load_config
from oncoseg_node.errors import ConfigError
from tests.conftest import REPO
from tests.listeners import NotListening, wait_for_own_listener, wait_while_running

BAD_COLOUR = re.compile(r"color: \[[^\]]*\]")


def cli(*args: str, cwd: Path | None = None, env: dict | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess:
    # The package from this checkout, wherever the command runs.
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    env.pop("ONCOSEG_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "oncoseg_node.cli", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_packaged_defaults_are_the_repository_examples():
    assert DEFAULT_CONFIG.read_bytes() == (REPO / "config" / "oncoseg-node.yaml").read_bytes()
    assert DEFAULT_PROTOCOLS.read_bytes() == (REPO / "config" / "protocols.yaml").read_bytes()
    cfg = load_config(DEFAULT_CONFIG)
    assert cfg.protocols.read_bytes() == DEFAULT_PROTOCOLS.read_bytes()


def test_state_goes_under_the_user_data_folder_unless_configured(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert load_config(DEFAULT_CONFIG).state_dir == tmp_path / "data" / "oncoseg-node"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_state_dir() == tmp_path / "home" / ".local" / "share" / "oncoseg-node"


def bad_pair(tmp_path: Path) -> tuple[Path, Path]:
    protocols = tmp_path / "protocols.yaml"
    text = (REPO / "config" / "protocols.yaml").read_text()
    protocols.write_text(BAD_COLOUR.sub("color: [300, 0, 0]", text, count=1))
    config = tmp_path / "node.yaml"
    config.write_text(
        f"state_dir: {tmp_path / 'state'}\n"   # 1
        "protocols: protocols.yaml\n"           # 2
        "node:\n"                               # 3
        "  port: 70000\n"                       # 4  a bad value
        "series:\n"                             # 5
        "  quiet_periodd_s: 10\n"               # 6  a typo
    )
    return config, protocols


def test_one_check_config_run_lists_the_typo_the_bad_value_and_the_bad_colour(tmp_path):
    config, protocols = bad_pair(tmp_path)
    colour_line = next(i for i, line in enumerate(protocols.read_text().splitlines(), 1)
                       if "[300, 0, 0]" in line)
    proc = cli("check-config", "--config", str(config))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == "oncoseg-node: invalid configuration: 3 problem(s)"
    assert lines[1:] == [
        f"{config}:4: node.port: 70000 is not a TCP port (1-65535)",
        f"{config}:6: series.quiet_periodd_s: unknown key (did you mean 'quiet_period_s'?)",
        f"{protocols}:{colour_line}: structures.External.color: [300, 0, 0] is not "
        "[R, G, B] in 0..255",
    ]
    assert not (tmp_path / "state").exists()


@pytest.mark.peers  # runs the daemon command
def test_run_with_a_bad_protocols_file_creates_nothing(tmp_path):
    config, protocols = bad_pair(tmp_path)
    config.write_text(f"state_dir: {tmp_path / 'state'}\nprotocols: protocols.yaml\n")
    proc = cli("run", "--config", str(config))
    assert proc.returncode == 2 and "structures.External.color" in proc.stderr
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("content, expected", [
    ("node:\n  port: [1,\n  ae_title: X\n", r":4:1: not valid YAML: .*flow sequence at line 2\)$"),
    ("node: {port: 1\nseries: {}\n", r":2:\d+: not valid YAML: "),
    ("\tnode: 1\n", r":1:1: not valid YAML: found character '\\t'"),
])
def test_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path, content, expected):
    path = tmp_path / "node.yaml"
    path.write_text(content)
    proc = cli("check-config", "--config", str(path))
    assert proc.returncode == 2
    (problem,) = proc.stderr.strip().splitlines()[1:]
    assert problem.startswith(str(path)) and re.search(expected, problem), problem
    assert "<unicode string>" not in proc.stderr


def test_bytes_that_are_not_utf8_name_the_file_and_offset(tmp_path):
    path = tmp_path / "node.yaml"
    path.write_bytes(b"node:\n  ae_title: CT\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        f"{path}:2: not UTF-8 text (byte 0xe9 at offset 20); save the file as UTF-8"]


def test_misplaced_and_mistyped_keys_get_the_closest_valid_key(tmp_path):
    path = tmp_path / "node.yaml"
    path.write_text(f"state_dir: {tmp_path}\nprotocols: {DEFAULT_PROTOCOLS}\n"
                    "node: {ae_titel: X}\nhttp: {prot: 1}\nlogging: {colour: red}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        f"{path}:3: node.ae_titel: unknown key (did you mean 'ae_title'?)",
        f"{path}:4: http.prot: unknown key (did you mean 'port'?)",
        f"{path}:5: logging.colour: unknown key",
    ]


def test_init_writes_the_commented_examples_and_never_overwrites(tmp_path):
    target = tmp_path / "etc"
    proc = cli("init", str(target))
    assert proc.returncode == 0, proc.stderr
    assert (target / "oncoseg-node.yaml").read_bytes() == DEFAULT_CONFIG.read_bytes()
    assert (target / "protocols.yaml").read_bytes() == DEFAULT_PROTOCOLS.read_bytes()
    assert "check-config --config" in proc.stdout
    again = cli("init", str(target))
    assert again.returncode == 1 and "--force" in again.stderr
    check = cli("check-config", "--config", str(target / "oncoseg-node.yaml"),
                env={"XDG_DATA_HOME": str(tmp_path / "data")})
    assert check.returncode == 0, check.stderr
    assert f"state in {tmp_path / 'data' / 'oncoseg-node'}" in check.stdout
    assert not (tmp_path / "data").exists()  # checking creates nothing


@pytest.mark.peers
def _own_namespace(pid: int) -> bool | None:
    """True once ``pid`` runs in a network namespace other than this process's."""
    try:
        theirs = os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None
    return True if theirs != os.readlink("/proc/self/ns/net") else None


def _hold(port: int) -> socket.socket | None:
    """A listening socket on ``port`` in this namespace (None where something else has it)."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()
    except OSError:
        sock.close()
        return None
    return sock


def test_run_with_no_arguments_from_outside_the_repository_starts_on_the_packaged_default(
        tmp_path):
    """The packaged default listens on 11112 (DICOM) and 8080 (HTTP), its state under
    $XDG_DATA_HOME. Run from an empty folder far from the repository.

    Those ports are fixed, so the node runs in a network namespace of its own:
    anything else on the machine listening there (another suite's node, a real
    one) neither stops it nor is mistaken for it. This process holds both ports
    meanwhile to show it.
    """
    folder = tmp_path / "anywhere"
    folder.mkdir()
    env = {"XDG_DATA_HOME": str(tmp_path / "data"), "HOME": str(tmp_path / "home")}
    held = [_hold(port) for port in (11112, 8080)]
    proc = subprocess.Popen(["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"',
                             "sh", sys.executable, "-m", "oncoseg_node.cli", "run"], cwd=folder,
                            env={**os.environ, "PYTHONPATH": str(REPO), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        try:
            # Until unshare has run, the child is still in this namespace.
            wait_while_running(proc, lambda: _own_namespace(proc.pid), 30, "unshare")
            wait_for_own_listener(proc, 11112, 60, "the node on its packaged default")
        except NotListening as error:
            proc.kill()
            raise type(error)(f"{error}:\n{proc.communicate()[0]}") from None
        status = cli("status", cwd=folder, env=env)
    finally:
        proc.terminate()
        output = proc.communicate(timeout=60)[0]
        for sock in held:
            if sock is not None:
                sock.close()
    assert proc.returncode == 0, output
    assert '"started"' in output or "started" in output
    state = tmp_path / "data" / "oncoseg-node"
    assert (state / "ledger.sqlite3").is_file()
    assert status.returncode == 0 and "no jobs" in status.stdout
    assert not list(folder.iterdir())  # nothing written where it was started
