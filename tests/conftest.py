"""Shared fixtures: a node config written to disk and loaded the real way."""

from __future__ import annotations

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
