"""Real DICOM peers for tests: DCMTK storescp/storescu/echoscu on loopback.

Receivers are started with TCP_NODELAY=1 (otherwise DCMTK stalls ~40 ms per
instance on delayed ACKs). Ports are ephemeral: picked free, then bound by
the peer.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port}")


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise RuntimeError(f"{tool} is not installed (Debian packages dcmtk / dicom3tools)")
    return path


@contextmanager
def storescp(out_dir: Path, *, aet: str = "TPS", extra: Sequence[str] = (),
             port: int | None = None) -> Iterator[int]:
    """DCMTK storescp as a planning system; yields its port."""
    port = port or free_port()
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [require("storescp"), "--aetitle", aet, "--output-directory", str(out_dir),
         "--accept-all", *extra, str(port)],
        env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        wait_for_port(port)
        yield port
    finally:
        stop_process(proc, grace=5)


def stop_process(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM, then SIGKILL if the peer has not exited within ``grace`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def storescu(files: Sequence[Path] | Path, port: int, *, called: str = "ONCOSEG",
             calling: str = "CTSIM", timeout: float = 120) -> subprocess.CompletedProcess:
    """DCMTK storescu sending files (or a folder, scanned) to 127.0.0.1:port."""
    args = [require("storescu"), "-aet", calling, "-aec", called, "-xs"]
    targets = [str(files)] if isinstance(files, Path) else [str(f) for f in files]
    if isinstance(files, Path) and files.is_dir():
        args += ["--scan-directories"]
    return subprocess.run([*args, "127.0.0.1", str(port), *targets], env=DCMTK_ENV,
                          capture_output=True, text=True, timeout=timeout)


def dciodvfy(path: Path) -> tuple[list[str], str]:
    """Run dciodvfy; returns (error lines, whole output)."""
    proc = subprocess.run([require("dciodvfy"), str(path)], capture_output=True, text=True,
                          timeout=60)
    output = proc.stdout + proc.stderr
    return [line for line in output.splitlines() if line.startswith("Error")], output


def send_raw(port: int, path: Path) -> Any:
    """Send a file's bytes as they are: command UIDs from its file meta, dataset unparsed."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title="CTSIM")
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", port, ae_title="ONCOSEG")
        assert assoc.is_established
        try:
            return assoc.send_c_store(path)
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
