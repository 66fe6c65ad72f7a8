"""Receive throughput: oncoseg-node beside DCMTK storescp and a real Orthanc.

The same 200 CT files of 512x512 (the phantom) are sent by DCMTK storescu in
one association to each receiver, all on loopback with TCP_NODELAY=1, in the
same run. oncoseg-node and Orthanc (SyncStorageArea) fsync every file before
answering; storescp does not sync, so it is a ceiling, not a like-for-like
peer. Prints, per receiver, instances/s and the CPU time (user + system, from
/proc/PID/stat) the receiving process spent per instance during the send,
then the per-round ratios to Orthanc and their medians. Wall-clock rates move
with the load of a shared machine; CPU per instance moves much less. Run:
    python -m bench.receive_throughput [--files 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.rtstruct_write import machine
from oncoseg_node.commissioning.phantom import write_phantom
from tests.conftest import write_config
from tests.daemon import Daemon
from tests.orthanc_peer import orthanc
from tests.peers import DCMTK_ENV, require, storescp

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    # after the command name: state is field 3, utime 14 and stime 15 (proc(5))
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def send(files: Path, port: int, called: str) -> float:
    started = time.perf_counter()
    proc = subprocess.run([require("storescu"), "-aec", called, "--scan-directories",
                           "127.0.0.1", str(port), str(files)],
                          env=DCMTK_ENV, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"storescu to {called} failed: {proc.stderr[-500:]}")
    return elapsed


def measured(files: Path, count: int, pid: int, port: int,
             called: str) -> tuple[float, float]:
    """(instances/s, receiver CPU milliseconds per instance) of one send."""
    before = cpu_seconds(pid)
    elapsed = send(files, port, called)
    return count / elapsed, (cpu_seconds(pid) - before) * 1000 / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        files = tmp_path / "ct"
        write_phantom(files, slices=args.files)
        rates: dict[str, list[float]] = {"oncoseg-node": [], "orthanc": [], "storescp": []}
        cpu_ms: dict[str, list[float]] = {"oncoseg-node": [], "orthanc": []}
        for round_ in range(args.rounds):
            run = tmp_path / f"round{round_}"
            # A long quiet period keeps segmentation out of the measured window.
            config = write_config(run.mkdir(parents=True) or run,
                                  series={"quiet_period_s": 600}, http={"enabled": False})
            daemon = Daemon(config, 0, run / "daemon.log").start()
            assert daemon.proc is not None
            try:
                rate, cpu = measured(files, args.files, daemon.proc.pid, daemon.port,
                                     "ONCOSEG")
            finally:
                daemon.kill()
            rates["oncoseg-node"].append(rate)
            cpu_ms["oncoseg-node"].append(cpu)
            with orthanc(run / "orthanc") as peer:
                rate, cpu = measured(files, args.files, peer.pid, peer.dicom_port,
                                     peer.aet)
            rates["orthanc"].append(rate)
            cpu_ms["orthanc"].append(cpu)
            with storescp(run / "storescp") as scp_port:
                rates["storescp"].append(args.files / send(files, scp_port, "ANY"))
            print(f"round {round_ + 1}: node {rates['oncoseg-node'][-1]:.1f}/s "
                  f"{cpu_ms['oncoseg-node'][-1]:.2f} ms CPU, orthanc {rates['orthanc'][-1]:.1f}/s "
                  f"{cpu_ms['orthanc'][-1]:.2f} ms CPU, storescp {rates['storescp'][-1]:.1f}/s",
                  flush=True)
        for name, values in rates.items():
            cpu_text = ""
            if name in cpu_ms:
                cpu_text = (f"; CPU median {statistics.median(cpu_ms[name]):5.2f} ms/instance "
                            f"(rounds: {', '.join(f'{v:.2f}' for v in cpu_ms[name])})")
            print(f"{name:>13}: median {statistics.median(values):6.1f} instances/s  "
                  f"(rounds: {', '.join(f'{v:.1f}' for v in values)}){cpu_text}")
        rate_ratio = [n / o for n, o in zip(rates["oncoseg-node"], rates["orthanc"], strict=True)]
        cpu_ratio = [o / n for n, o in zip(cpu_ms["oncoseg-node"], cpu_ms["orthanc"],
                                           strict=True)]
        scp_ratio = [n / s for n, s in zip(rates["oncoseg-node"], rates["storescp"], strict=True)]
        print(f"ratio oncoseg-node / orthanc, instances/s: median "
              f"{statistics.median(rate_ratio):.2f} (rounds: "
              f"{', '.join(f'{r:.2f}' for r in rate_ratio)})")
        print(f"ratio orthanc / oncoseg-node, CPU per instance (>1: node uses less): median "
              f"{statistics.median(cpu_ratio):.2f} (rounds: "
              f"{', '.join(f'{r:.2f}' for r in cpu_ratio)})")
        print(f"ratio oncoseg-node / storescp, instances/s: median "
              f"{statistics.median(scp_ratio):.2f} (storescp does not fsync)")


if __name__ == "__main__":
    main()
