"""Latency from the last CT instance acknowledged to the RTSTRUCT acknowledged by the TPS.

The daemon runs as in production (its JSON log gives the stage times); DCMTK
storescu sends a 96-slice 512x512 phantom and storescp is the TPS. Stages:
quiet period (last instance -> job claimed), load (read and gate the
series), segment, write (build, write, read back and verify the structure
set), send (written -> accepted). The peer in the same run is DCMTK storescu sending the very same
RTSTRUCT file to the same storescp. Run: python -m bench.end_to_end_latency
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import tempfile
import time
from pathlib import Path

from bench.rtstruct_write import machine
from oncoseg_node.commissioning.phantom import write_phantom
from tests.conftest import write_config
from tests.daemon import Daemon, wait_until
from tests.peers import DCMTK_ENV, free_port, require, storescp, storescu


def events(log: str) -> tuple[dict[str, float], dict]:
    """Time stamps of the job's milestones, and the job_contoured record (stage times)."""
    found, contoured = {}, {}
    for line in log.splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        if record.get("event") in ("job_started", "job_contoured", "rtstruct_delivered"):
            found.setdefault(record["event"],
                             dt.datetime.fromisoformat(record["timestamp"]).timestamp())
        if record.get("event") == "job_contoured":
            contoured = record
    return found, contoured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=96)
    parser.add_argument("--quiet", type=float, default=10.0)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        write_phantom(tmp_path / "ct", slices=args.slices)
        port = free_port()
        with storescp(tmp_path / "tps") as tps:
            config = write_config(tmp_path, node={"port": port},
                                  series={"quiet_period_s": args.quiet},
                                  destinations=[{"name": "tps", "ae_title": "TPS",
                                                 "host": "127.0.0.1", "port": tps}])
            daemon = Daemon(config, port, tmp_path / "daemon.log").start()
            try:
                assert storescu(tmp_path / "ct", port).returncode == 0
                acknowledged = time.time()
                wait_until(lambda: "rtstruct_delivered" in daemon.log(), 600, "delivery")
            finally:
                daemon.stop()
            stamps, stages = events(daemon.log())
            (rtstruct,) = list((tmp_path / "tps").iterdir())
            started = time.perf_counter()
            subprocess.run([require("storescu"), "-aec", "TPS", "127.0.0.1", str(tps),
                            str(rtstruct)], env=DCMTK_ENV, check=True, capture_output=True)
            peer_send = time.perf_counter() - started
        quiet = stamps["job_started"] - acknowledged
        contour = stamps["job_contoured"] - stamps["job_started"]
        send = stamps["rtstruct_delivered"] - stamps["job_contoured"]
        total = stamps["rtstruct_delivered"] - acknowledged
        print(f"series: {args.slices} slices of 512x512, quiet period {args.quiet:g} s")
        print(f"quiet period (last instance -> job claimed): {quiet:6.2f} s")
        print(f"contour (job claimed -> structure set written): {contour:6.2f} s, of which")
        print(f"  load (read, sort, geometry gate):           {stages['load_s']:6.2f} s")
        print(f"  segment:                                    {stages['segment_s']:6.2f} s")
        print(f"  write (build, write, read back, verify):    {stages['write_s']:6.2f} s")
        print(f"send (written -> accepted by storescp):       {send:6.2f} s")
        print(f"total:                                        {total:6.2f} s")
        print(f"peer: storescu sending the same RTSTRUCT: {peer_send:.2f} s; "
              f"ratio our send stage / storescu: {send / peer_send:.2f}")
        print(f"ratio total / quiet period setting: {total / args.quiet:.2f}")


if __name__ == "__main__":
    main()
