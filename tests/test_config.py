from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from oncoseg_node.config import load_config
from oncoseg_node.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_shipped_config_is_valid_and_resolves_paths_against_its_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    cfg = load_config(REPO / "config" / "oncoseg-node.yaml")
    assert cfg.node.ae_title == "ONCOSEG"
    assert cfg.state_dir == tmp_path / "oncoseg-node"  # unset: the user's data folder
    assert cfg.protocols == (REPO / "config" / "protocols.yaml").resolve()
    assert cfg.destinations[0].retry.first_delay_s == 10
    assert cfg.engine.name == "classical"


def test_config_is_frozen(make_config):
    cfg = make_config()
    with pytest.raises(AttributeError):
        cfg.node.port = 1  # type: ignore[misc]


def test_every_problem_is_reported_with_its_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "node: {ae_title: THIS_TITLE_IS_WAY_TOO_LONG, port: 70000, colour: red}\n"
        "state_dir: state\nprotocols: missing.yaml\n"
        "series: {quiet_period_s: soon}\n"
        "destinations:\n  - {name: tps, ae_title: TPS, host: 127.0.0.1}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = "\n".join(info.value.problems)
    assert "node.colour: unknown key" in problems
    assert "series.quiet_period_s: expected a number, got 'soon'" in problems
    assert "destinations[0].port: required key missing" in problems
    assert "node.ae_title: 'THIS_TITLE_IS_WAY_TOO_LONG' is not a valid AE title" in problems
    assert "node.port: 70000 is not a TCP port" in problems
    assert "protocols: " in problems and "does not exist" in problems
    assert len(info.value.problems) == 6


def test_semantic_problems_are_all_listed(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "node: {ae_title: THIS_TITLE_IS_WAY_TOO_LONG, port: 70000, max_pdu: 1024}\n"
        "state_dir: state\nprotocols: missing.yaml\n"
        "engine: {name: magic}\n"
        "destinations:\n  - {name: tps, ae_title: TPS, host: 127.0.0.1, port: 104,"
        " profile: nosuch, retry: {first_delay_s: 60, max_delay_s: 5}}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = "\n".join(info.value.problems)
    for expected in ("node.ae_title", "node.port: 70000", "node.max_pdu", "engine.name",
                     "destinations[0].profile", "destinations[0].retry.max_delay_s",
                     "protocols: "):
        assert expected in text


def test_check_config_cli_lists_three_mistakes_and_exits_2(tmp_path):
    path = tmp_path / "three.yaml"
    path.write_text(
        f"state_dir: state\nprotocols: {REPO / 'config' / 'protocols.yaml'}\n"
        "node: {port: -5, allowed_peers: [not-an-ip]}\n"
        "logging: {format: xml}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "oncoseg_node.cli", "check-config", "--config", str(path)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "3 problem(s)" in proc.stderr
    assert "node.port" in proc.stderr
    assert "node.allowed_peers[0]" in proc.stderr
    assert "logging.format" in proc.stderr


def test_check_config_cli_accepts_the_shipped_config():
    proc = subprocess.run(
        [sys.executable, "-m", "oncoseg_node.cli", "check-config", "--config",
         str(REPO / "config" / "oncoseg-node.yaml")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "valid" in proc.stdout
