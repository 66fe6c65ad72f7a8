"""Receive throughput: oncoseg-node beside DCMTK storescp and a real Orthanc.

The same 200 CT files of 512x512 (the phantom) are sent by DCMTK storescu in
one association to each receiver, all on loopback with TCP_NODELAY=1, in the
same run. oncoseg-node and Orthanc (SyncStorageArea) fsync every file before
answering; storescp does not sync, so it is a ceiling, not a like-for-like
peer. Prints instances/s for each and the ratios. Run:
    python -m bench.receive_throughput [--files 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
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
from tests.peers import DCMTK_ENV, free_port, require, storescp


def send(files: Path, port: int, called: str) -> float:
    started = time.perf_counter()
    proc = subprocess.run([require("storescu"), "-aec", called, "--scan-directories",
                           "127.0.0.1", str(port), str(files)],
                          env=DCMTK_ENV, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"storescu to {called} failed: {proc.stderr[-500:]}")
    return elapsed


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
        for round_ in range(args.rounds):
            run = tmp_path / f"round{round_}"
            port = free_port()
            # A long quiet period keeps segmentation out of the measured window.
            config = write_config(run.mkdir(parents=True) or run, node={"port": port},
                                  series={"quiet_period_s": 600}, http={"enabled": False})
            daemon = Daemon(config, port, run / "daemon.log").start()
            try:
                rates["oncoseg-node"].append(args.files / send(files, port, "ONCOSEG"))
            finally:
                daemon.kill()
            with orthanc(run / "orthanc") as peer:
                rates["orthanc"].append(args.files / send(files, peer.dicom_port, peer.aet))
            with storescp(run / "storescp") as scp_port:
                rates["storescp"].append(args.files / send(files, scp_port, "ANY"))
        median = {name: statistics.median(values) for name, values in rates.items()}
        for name, values in rates.items():
            print(f"{name:>13}: median {median[name]:6.1f} instances/s  "
                  f"(rounds: {', '.join(f'{v:.1f}' for v in values)})")
        print(f"ratio oncoseg-node / orthanc : {median['oncoseg-node'] / median['orthanc']:.2f}")
        print(f"ratio oncoseg-node / storescp: {median['oncoseg-node'] / median['storescp']:.2f} "
              "(storescp does not fsync)")


if __name__ == "__main__":
    main()
