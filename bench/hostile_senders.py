"""Hostile and broken senders against the daemon, beside Orthanc under the same load.

One attack, all at once, from addresses 127.0.0.2-127.0.0.254 (as many
hosts would), while a normal scanner (DCMTK storescu, 127.0.0.1) keeps
trying to store one slice:

- one 6-byte header declaring a 4 GiB PDU, before any association;
- 50 half-sent PDUs (A-ASSOCIATE-RQ headers with half their bytes);
- ``max_associations`` established associations, each stalled inside a
  P-DATA PDU (its header and 10 bytes);
- 250 idle half-associations (16 bytes of an A-ASSOCIATE-RQ each).

Printed for the node and for Orthanc (its defaults) under the same attack in
the same run: how many hostile connections it accepted, RSS growth, when
the scanner first stored after the attack began, and, for the node, the
slowest /healthz answer during the attack. The node must grow < 100 MB,
store within network timeout + 5 s and answer /healthz in < 1 s.
Run: python -m bench.hostile_senders [--timeout-s 10]
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.rtstruct_write import machine
from tests import rawpdu
from tests.conftest import write_config
from tests.ctfactory import encode, series
from tests.daemon import Daemon
from tests.orthanc_peer import orthanc
from tests.peers import DCMTK_ENV, require

MAX_ASSOCIATIONS = 4


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def source(i: int) -> str:
    return f"127.0.0.{2 + i % 253}"


@dataclass
class Attack:
    """The hostile connections; opening them stops after ``budget_s`` (a receiver
    that stops accepting would otherwise make each connect wait for its timeout)."""

    port: int
    called: str
    budget_s: float = 20.0
    sockets: list[socket.socket] = field(default_factory=list)
    refused: int = 0
    _deadline: float = 0.0

    def _open(self, i: int) -> socket.socket | None:
        if time.monotonic() > self._deadline:
            self.refused += 1
            return None
        try:
            sock = rawpdu.connect(self.port, source=source(i), timeout=1)
        except OSError:
            self.refused += 1
            return None
        self.sockets.append(sock)
        return sock

    def launch(self) -> None:
        self._deadline = time.monotonic() + self.budget_s
        n = 0
        if (sock := self._open(n)) is not None:  # 4 GiB before any association
            with contextlib.suppress(OSError):
                sock.sendall(rawpdu.pdu_header(0x01, 0xFFFFFFFF))
        for _ in range(50):  # half-sent PDUs
            n += 1
            if (sock := self._open(n)) is not None:
                request = rawpdu.associate_rq(called=self.called)
                with contextlib.suppress(OSError):
                    sock.sendall(request[:len(request) // 2])
        for _ in range(MAX_ASSOCIATIONS):  # established, then stalled inside a P-DATA PDU
            n += 1
            if (sock := self._open(n)) is not None:
                with contextlib.suppress(OSError):
                    sock.sendall(rawpdu.associate_rq(called=self.called))
                    if rawpdu.read_pdu(sock)[0] == 0x02:
                        sock.sendall(rawpdu.pdu_header(0x04, 16384) + bytes(10))
        for _ in range(250):  # idle half-associations
            n += 1
            if (sock := self._open(n)) is not None:
                with contextlib.suppress(OSError):
                    sock.sendall(rawpdu.associate_rq(called=self.called)[:16])

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


@dataclass
class Result:
    accepted: int = 0
    rss_growth_mib: float = 0.0
    first_store_s: float | None = None
    healthz_max_s: float = 0.0


def watch(pid: int, baseline: float, result: Result, stop: threading.Event,
          healthz: str | None) -> None:
    while not stop.is_set():
        result.rss_growth_mib = max(result.rss_growth_mib, rss_mib(pid) - baseline)
        if healthz is not None:
            started = time.monotonic()
            try:
                with urllib.request.urlopen(healthz, timeout=10) as response:
                    response.read()
            except OSError:
                pass
            result.healthz_max_s = max(result.healthz_max_s, time.monotonic() - started)
        stop.wait(0.2)


def scanner_stores(port: int, called: str, path: Path) -> bool:
    proc = subprocess.run([require("storescu"), "-to", "5", "-ta", "5", "-aec", called,
                           "127.0.0.1", str(port), str(path)], env=DCMTK_ENV,
                          capture_output=True, text=True, timeout=30)
    return proc.returncode == 0 and "E:" not in proc.stderr


def run_attack(pid: int, port: int, called: str, slice_path: Path, limit_s: float,
               healthz: str | None) -> Result:
    result = Result()
    baseline = rss_mib(pid)
    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(pid, baseline, result, stop, healthz))
    watcher.start()
    attack = Attack(port, called)
    started = time.monotonic()
    try:
        attack.launch()
        result.accepted = len(attack.sockets)
        while time.monotonic() - started < limit_s:
            if scanner_stores(port, called, slice_path):
                result.first_store_s = time.monotonic() - started
                break
            time.sleep(0.5)
    finally:
        attack.close()
        stop.set()
        watcher.join()
    return result


@contextlib.contextmanager
def node(tmp: Path, timeout_s: float) -> Iterator[tuple[int, int, str]]:
    config = write_config(
        tmp, node={"max_associations": MAX_ASSOCIATIONS,
                   "acse_timeout_s": timeout_s, "network_timeout_s": timeout_s})
    daemon = Daemon(config, 0, tmp / "daemon.log").start()
    try:
        time.sleep(2)  # the HTTP side and the worker are up
        assert daemon.proc is not None
        yield daemon.proc.pid, daemon.port, f"http://127.0.0.1:{daemon.http_port}/healthz"
    finally:
        daemon.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout-s", type=float, default=10.0,
                        help="network and ACSE timeout of both receivers")
    args = parser.parse_args()
    limit = args.timeout_s + 30
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        slice_path = tmp / "slice.dcm"
        slice_path.write_bytes(encode(series(1, size=512)[0]))
        print(machine())
        (tmp / "node").mkdir()
        with node(tmp / "node", args.timeout_s) as (pid, port, healthz):
            print("attacking the node ...", flush=True)
            ours = run_attack(pid, port, "ONCOSEG", slice_path, limit, healthz)
        print("attacking Orthanc ...", flush=True)
        with orthanc(tmp / "orthanc") as peer:
            # Orthanc's equivalent of the network timeout.
            theirs = run_attack(peer.pid, peer.dicom_port, peer.aet,
                                slice_path, limit, None)
    print(f"attack: 1 x 4 GiB header, 50 half-sent PDUs, {MAX_ASSOCIATIONS} stalled P-DATA "
          f"(max_associations {MAX_ASSOCIATIONS}), 250 idle half-associations; "
          f"timeouts {args.timeout_s:g} s")

    def show(value: float | None) -> str:
        return "never" if value is None else f"{value:.1f} s"

    print(f"node:    {ours.accepted}/305 hostile connections accepted, RSS "
          f"+{ours.rss_growth_mib:.1f} MiB, scanner stored after {show(ours.first_store_s)}, "
          f"slowest /healthz {ours.healthz_max_s * 1000:.0f} ms")
    print(f"orthanc: {theirs.accepted}/305 hostile connections accepted, RSS "
          f"+{theirs.rss_growth_mib:.1f} MiB, scanner stored after "
          f"{show(theirs.first_store_s)} (gave up at {limit:g} s)")
    if theirs.rss_growth_mib >= 1.0:
        print(f"RSS growth node/orthanc: {ours.rss_growth_mib / theirs.rss_growth_mib:.2f}")
    if ours.first_store_s is not None:
        theirs_s = theirs.first_store_s if theirs.first_store_s is not None else limit
        bound = "" if theirs.first_store_s is not None else " (at most: Orthanc never stored)"
        print(f"time to store node/orthanc: {ours.first_store_s / theirs_s:.2f}{bound}")
    ok = (ours.rss_growth_mib < 100 and ours.first_store_s is not None
          and ours.first_store_s <= args.timeout_s + 5 and ours.healthz_max_s < 1.0)
    print("targets (RSS < 100 MB, store within timeout + 5 s, /healthz < 1 s):",
          "met" if ok else "NOT met")


if __name__ == "__main__":
    main()
