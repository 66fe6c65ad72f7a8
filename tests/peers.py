"""Real DICOM peers for tests: DCMTK storescp/storescu/echoscu on loopback.

Receivers are started with TCP_NODELAY=1 (otherwise DCMTK stalls ~40 ms per
instance on delayed ACKs). These peers cannot bind port 0 and say which port
they got, so a port is picked free and handed on; the peer counts as started
only once its own process listens there (``tests.listeners``). Should another
process take the port first, the peer is started again on a new one.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from tests.listeners import PortTaken, wait_for_own_listener

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


PORT_TRIES = 5  # starts of a peer whose free port another process took meanwhile


def free_port() -> int:
    """A port free now, for a peer that cannot bind port 0: another process may
    take it before the peer binds it, so wait with ``wait_for_own_listener``."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_listening(launch: Callable[[list[int]], subprocess.Popen], what: str, *,
                    ports: Sequence[int] | None = None, count: int = 1,
                    timeout: float = 10.0) -> tuple[subprocess.Popen, list[int]]:
    """Start a peer by ``launch(ports)`` and return once its own process listens on
    every port. ``ports`` given are kept (another process on one fails at once);
    otherwise ``count`` free ports are picked, and picked again if one was taken."""
    tries = 1 if ports is not None else PORT_TRIES
    for attempt in range(1, tries + 1):
        chosen = list(ports) if ports is not None else [free_port() for _ in range(count)]
        proc = launch(chosen)
        try:
            for port in chosen:
                wait_for_own_listener(proc, port, timeout, what)
            return proc, chosen
        except PortTaken:
            stop_process(proc, grace=5)
            if attempt == tries:
                raise
        except BaseException:
            stop_process(proc, grace=5)
            raise
    raise AssertionError("unreachable")


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise RuntimeError(f"{tool} is not installed (Debian packages dcmtk / dicom3tools)")
    return path


@contextmanager
def storescp(out_dir: Path, *, aet: str = "TPS", extra: Sequence[str] = (),
             port: int | None = None) -> Iterator[int]:
    """DCMTK storescp as a planning system; yields its port."""
    out_dir.mkdir(parents=True, exist_ok=True)

    def launch(ports: list[int]) -> subprocess.Popen:
        return subprocess.Popen(
            [require("storescp"), "--aetitle", aet, "--output-directory", str(out_dir),
             "--accept-all", *extra, str(ports[0])],
            env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )

    proc, (bound,) = start_listening(launch, f"storescp {aet}",
                                     ports=None if port is None else [port])
    try:
        yield bound
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
