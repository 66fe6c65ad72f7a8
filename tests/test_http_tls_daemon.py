"""The real daemon over HTTPS: sign-in needed, a renewed certificate on SIGHUP, no secret logged."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import ssl
import subprocess
import sys

import pytest

from tests.conftest import write_config
from tests.daemon import Daemon, wait_until
from tests.web_clients import Curl, make_pki

pytestmark = pytest.mark.peers

PASSWORD = "daemon-pass-123456"


def served_certificate(port: int, ca) -> bytes:
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_daemon_serves_https_to_signed_in_users_and_reloads_its_certificate(tmp_path):
    pki = make_pki(tmp_path / "pki")
    cert, key = tmp_path / "node.pem", tmp_path / "node.key"
    shutil.copy(pki.cert, cert)
    shutil.copy(pki.key, key)
    config = write_config(tmp_path, http={
        "tls": {"cert_file": str(cert), "key_file": str(key)},
        "auth": {"users_file": str(tmp_path / "users.json")}})
    subprocess.run([sys.executable, "-m", "oncoseg_node.cli", "users", "add", "ana", "--role",
                    "physicist", "--config", str(config)], input=PASSWORD + "\n", text=True,
                   check=True, capture_output=True, timeout=60)
    daemon = Daemon(config, 0, tmp_path / "node.log").start()
    assert daemon.http_port is not None and daemon.proc is not None
    curl = Curl(f"https://127.0.0.1:{daemon.http_port}", pki.ca, tmp_path / "jar.txt")
    health = curl("/healthz")
    assert health.status == 200 and json.loads(health.body)["checks"]
    assert curl("/jobs").status == 401
    assert curl("/jobs", "-u", f"ana:{PASSWORD}").status == 200
    assert curl("/metrics").status == 200  # no token configured: loopback clients only
    first = served_certificate(daemon.http_port, pki.ca)

    renewed = make_pki(tmp_path / "pki", name="renewed")
    shutil.copy(renewed.cert, cert)
    shutil.copy(renewed.key, key)
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: served_certificate(daemon.http_port, pki.ca) != first, 10,
               "the renewed certificate")
    assert curl("/jobs", "-u", f"ana:{PASSWORD}").status == 200
    assert daemon.stop() == 0
    log = daemon.log()
    assert '"http_tls_reloaded"' in log and PASSWORD not in log
    assert any(json.loads(line).get("event") == "http_view" and
               json.loads(line).get("user") == "ana"
               for line in log.splitlines() if line.startswith("{"))


def test_daemon_refuses_plain_http_on_a_network_address(tmp_path):
    config = write_config(tmp_path, http={"host": "0.0.0.0"})
    proc = subprocess.run([sys.executable, "-m", "oncoseg_node.cli", "run", "--config",
                           str(config)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "http.tls.cert_file" in proc.stderr
