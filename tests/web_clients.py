"""Real HTTPS clients for the sign-in tests: a test CA made with openssl, curl, and Chromium.

Chromium has no flag to trust one extra CA without NSS tools, so it is told
to accept exactly our server's public key (``--ignore-certificate-errors-spki-list``)
through a ``chromium`` wrapper put first on PATH; tests/browser.py starts it
as it finds it.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.peers import require


def openssl(*args: str, input: bytes | None = None) -> bytes:  # noqa: A002 - like subprocess
    return subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60,
                          input=input).stdout


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path

    def spki_sha256(self) -> str:
        """The server key's SPKI hash, base64, as Chromium's pin list wants it."""
        public = openssl("x509", "-in", str(self.cert), "-pubkey", "-noout")
        der = openssl("pkey", "-pubin", "-outform", "der", input=public)
        digest = openssl("dgst", "-sha256", "-binary", input=der)
        return openssl("base64", "-A", input=digest).decode().strip()


def make_pki(directory: Path, name: str = "server") -> Pki:
    """A CA and a server certificate for 127.0.0.1 and localhost, signed by it."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca = directory / "ca.key", directory / "ca.pem"
    if not ca.exists():
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                "-subj", "/CN=Test CA", "-keyout", str(ca_key), "-out", str(ca))
    key, csr, cert = (directory / f"{name}.{ext}" for ext in ("key", "csr", "pem"))
    (directory / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", str(key), "-out", str(csr))
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
            "-CAcreateserial", "-days", "2", "-extfile", str(directory / f"{name}.ext"),
            "-out", str(cert))
    key.chmod(0o600)
    return Pki(ca, cert, key)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


class Curl:
    """curl against one HTTPS origin, trusting only the test CA, with its own cookie jar."""

    def __init__(self, base: str, ca: Path, jar: Path) -> None:
        self.base, self.ca, self.jar = base, ca, jar

    def __call__(self, path: str, *args: str) -> Answer:
        out = self.jar.with_suffix(".body")
        proc = subprocess.run(
            [require("curl"), "-sS", "--cacert", str(self.ca), "-b", str(self.jar),
             "-c", str(self.jar), "-D", "-", "-o", str(out), *args, self.base + path],
            capture_output=True, timeout=60)
        assert proc.returncode == 0, proc.stderr.decode()
        blocks = proc.stdout.decode(errors="replace").strip().split("\r\n\r\n")
        lines = blocks[-1].split("\r\n")
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        return Answer(int(lines[0].split()[1]), headers, out.read_bytes())

    def sign_in(self, user: str, password: str, next_path: str = "/jobs") -> Answer:
        form = self("/signin?next=" + next_path)
        token = re.search(r'name="csrf" value="([^"]+)"', form.text)
        assert token, form.text
        return self("/signin", "--data-urlencode", f"csrf={token.group(1)}",
                    "--data-urlencode", f"user={user}", "--data-urlencode",
                    f"password={password}", "--data-urlencode", f"next={next_path}")


def chromium_trusting(bin_dir: Path, pki: Pki) -> Path:
    """A ``chromium`` in ``bin_dir`` that accepts our server's key; put bin_dir first on PATH."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    wrapper = bin_dir / "chromium"
    wrapper.write_text("#!/bin/sh\n"
                       f"exec {require('chromium')} "
                       f"--ignore-certificate-errors-spki-list={pki.spki_sha256()} \"$@\"\n")
    wrapper.chmod(0o755)
    return bin_dir
