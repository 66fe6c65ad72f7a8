"""The HTTP access settings as ``check-config`` and the ``users`` command see them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from oncoseg_node.config import load_config
from oncoseg_node.errors import ConfigError
from oncoseg_node.ops.configcheck import check_files
from tests.conftest import write_config


def problems(tmp_path: Path, **http) -> list[str]:
    try:
        load_config(write_config(tmp_path, http=http))
    except ConfigError as exc:
        return exc.problems
    return []


def secret(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_the_default_stays_loopback_plain_and_open(tmp_path):
    report = check_files(write_config(tmp_path))
    assert report.problems == [] and report.config is not None
    http = report.config.http
    assert http.host == "127.0.0.1" and not http.tls.enabled and not http.auth.enabled
    assert not [w for w in report.warnings if "http." in w]


def test_a_network_address_needs_tls_and_accounts(tmp_path):
    found = problems(tmp_path, host="0.0.0.0")
    assert any("http.tls.cert_file: required when http.host is '0.0.0.0'" in p for p in found)
    assert any("http.auth.users_file: required" in p for p in found)


def test_allow_plain_behind_a_proxy_is_valid_with_a_warning(tmp_path):
    path = write_config(tmp_path, http={"host": "0.0.0.0", "allow_plain": True,
                                        "auth": {"trusted_proxy": ["10.0.0.5"]}})
    report = check_files(path)
    assert report.problems == []
    assert any(w.startswith("warning: http.allow_plain:") for w in report.warnings)
    proc = subprocess.run([sys.executable, "-m", "oncoseg_node.cli", "check-config",
                           "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "http.allow_plain" in proc.stdout


@pytest.mark.parametrize("content", [None, "not a key\n"])
def test_an_unreadable_or_wrong_key_file_names_the_key(tmp_path, content):
    cert = tmp_path / "cert.pem"
    cert.write_text("not a certificate\n")
    key = tmp_path / "key.pem"
    if content is not None:
        secret(key, content)
    found = problems(tmp_path, tls={"cert_file": str(cert), "key_file": str(key)})
    assert any("http.tls.key_file:" in p for p in found), found


def test_secret_files_readable_by_others_are_refused(tmp_path):
    users = secret(tmp_path / "users.json", '{"users": {}}', 0o644)
    token = secret(tmp_path / "token", "abc\n", 0o640)
    found = problems(tmp_path, auth={"users_file": str(users)}, metrics_token_file=str(token))
    assert any("http.auth.users_file:" in p and "0644" in p for p in found), found
    assert any("http.metrics_token_file:" in p and "0640" in p for p in found), found


def test_bad_proxy_and_role_settings_are_named(tmp_path):
    found = problems(tmp_path, auth={"trusted_proxy": ["proxy.example"],
                                     "group_roles": {"admins": "root"}})
    assert any("http.auth.trusted_proxy[0]" in p for p in found)
    assert any("http.auth.group_roles.admins" in p for p in found)


def users(config: Path, *args: str, password: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "oncoseg_node.cli", "users", *args,
                           "--config", str(config)], input=password, capture_output=True,
                          text=True, timeout=60)


def test_users_command_adds_changes_and_removes_accounts(tmp_path):
    users_file = tmp_path / "users.json"
    config = write_config(tmp_path, http={"auth": {"users_file": str(users_file)}})
    assert users(config, "add", "ana", "--role", "viewer", password="short\n").returncode == 1
    assert users(config, "add", "ana", "--role", "viewer",
                 password="long-enough-password\n").returncode == 0
    assert users_file.stat().st_mode & 0o777 == 0o600
    assert "long-enough-password" not in users_file.read_text()
    assert users(config, "add", "ana", "--role", "viewer",
                 password="long-enough-password\n").returncode == 1
    assert users(config, "passwd", "ana", "--role", "physicist",
                 password="another-long-password\n").returncode == 0
    assert users(config, "list").stdout == "ana\tphysicist\n"
    assert users(config, "remove", "ana").returncode == 0
    assert users(config, "list").stdout == ""
    users_file.chmod(0o644)
    refused = users(config, "list")
    assert refused.returncode != 0 and "0644" in refused.stderr


def test_users_command_takes_no_password_argument(tmp_path):
    config = write_config(tmp_path, http={"auth": {"users_file": str(tmp_path / "u.json")}})
    proc = users(config, "add", "ana", "--role", "viewer", "--password", "x" * 12)
    assert proc.returncode == 2 and "unrecognized arguments" in proc.stderr
