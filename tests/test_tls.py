"""DICOM TLS on the listener: mutual TLS, and a stalled client blocks no one."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from oncoseg_node.dicom import status
from oncoseg_node.intake.handlers import StoreHandlers
from oncoseg_node.intake.spool import Spool
from oncoseg_node.intake.transport import Receiver
from oncoseg_node.ledger import Ledger
from tests.ctfactory import series

pytestmark = pytest.mark.peers


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=Test CA", "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))
    for name, san in (("server", "IP:127.0.0.1"), ("client", "DNS:ctsim")):
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))
        openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"),
                "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
                "-extfile", str(d / f"{name}.ext"), "-out", str(d / f"{name}.pem"))
    return {p.stem + p.suffix.replace(".", "_"): p for p in d.iterdir()}


@pytest.fixture
def tls_node(make_config, pki):
    cfg = make_config(node={"tls": {"enabled": True, "cert_file": str(pki["server_pem"]),
                                    "key_file": str(pki["server_key"]),
                                    "ca_file": str(pki["ca_pem"]), "handshake_timeout_s": 5}})
    ledger, spool = Ledger(cfg.ledger_path), Spool(cfg.spool_dir)
    receiver = Receiver(cfg.node, StoreHandlers(cfg.node, cfg.series, spool, ledger))
    receiver.start()
    yield receiver, ledger
    receiver.stop_accepting()


def client_context(pki, with_cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca_pem"]))
    if with_cert:
        ctx.load_cert_chain(str(pki["client_pem"]), str(pki["client_key"]))
    return ctx


def tls_store(port: int, ctx: ssl.SSLContext):
    ae = AE(ae_title="CTSIM")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title="ONCOSEG", tls_args=(ctx, "127.0.0.1"))
    if not assoc.is_established:
        return None
    try:
        return int(assoc.send_c_store(series(1)[0]).Status)
    finally:
        assoc.release()


def test_mutual_tls_store_succeeds_with_a_client_certificate(tls_node, pki):
    receiver, _ = tls_node
    assert tls_store(receiver.port, client_context(pki)) == status.SUCCESS


def test_client_without_certificate_is_refused(tls_node, pki):
    receiver, ledger = tls_node
    assert tls_store(receiver.port, client_context(pki, with_cert=False)) is None
    assert ledger.open_series() == []


def test_stalled_tcp_connection_does_not_delay_another_tls_association(tls_node, pki):
    receiver, _ = tls_node
    stalled = socket.create_connection(("127.0.0.1", receiver.port))  # never says hello
    try:
        time.sleep(0.2)
        started = time.monotonic()
        assert tls_store(receiver.port, client_context(pki)) == status.SUCCESS
        assert time.monotonic() - started < 2.0
    finally:
        stalled.close()
