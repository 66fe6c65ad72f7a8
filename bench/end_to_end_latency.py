"""Latency from the last CT instance acknowledged to the RTSTRUCT acknowledged by the TPS.

The daemon runs as in production (its JSON log gives the stage times); DCMTK
storescu sends a 512x512 phantom series and storescp is the TPS. Two ways a
series is judged complete, each run ``--runs`` times (medians printed):

- count evidence: every slice carries ImagesInAcquisition, so the series is
  complete as soon as storescu releases the association;
- quiet period: no count evidence, so the node waits ``--quiet`` seconds.

Stages: wait (last instance -> job claimed), load (read and gate the series),
segment, write (build, verify and write the structure set), send (written ->
accepted). The peer in the same run is DCMTK storescu sending the very same
RTSTRUCT file to the same storescp. Run: python -m bench.end_to_end_latency
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import pydicom

from bench.rtstruct_write import machine
from oncoseg_node.commissioning.phantom import write_phantom
from tests.conftest import write_config
from tests.daemon import Daemon, wait_until
from tests.peers import DCMTK_ENV, require, storescp, storescu

STAGES = ("wait", "load", "segment", "write", "send", "total")


def events(log: str) -> tuple[dict[str, float], dict]:
    """Time stamps of the job's milestones, and the job_contoured record (stage times)."""
    found, contoured = {}, {}
    for line in log.splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        if record.get("event") in ("association_ended", "job_started", "job_contoured",
                                   "rtstruct_delivered"):
            # the last association's end: storescu released right after its last response
            stamp = dt.datetime.fromisoformat(record["timestamp"]).timestamp()
            if record["event"] == "association_ended":
                found["association_ended"] = stamp
            else:
                found.setdefault(record["event"], stamp)
        if record.get("event") == "job_contoured":
            contoured = record
    return found, contoured


def one_run(series: Path, run: Path, quiet: float) -> tuple[dict[str, float], float]:
    """Stage seconds of one series through a fresh node, and the peer's send time."""
    with storescp(run / "tps") as tps:
        config = write_config(run, series={"quiet_period_s": quiet},
                              http={"enabled": False},
                              destinations=[{"name": "tps", "ae_title": "TPS",
                                             "host": "127.0.0.1", "port": tps}])
        daemon = Daemon(config, 0, run / "daemon.log").start()
        try:
            assert storescu(series, daemon.port).returncode == 0
            wait_until(lambda: "rtstruct_delivered" in daemon.log(), 600, "delivery")
        finally:
            daemon.stop()
        stamps, stages = events(daemon.log())
        (rtstruct,) = list((run / "tps").iterdir())
        started = time.perf_counter()
        subprocess.run([require("storescu"), "-aec", "TPS", "127.0.0.1", str(tps),
                        str(rtstruct)], env=DCMTK_ENV, check=True, capture_output=True)
        peer_send = time.perf_counter() - started
    # the node's own clock throughout: released (= last instance acknowledged), job
    # claimed, structure set written (claimed + load + segment + write), delivered
    acknowledged = stamps["association_ended"]
    written = stamps["job_started"] + stages["load_s"] + stages["segment_s"] + stages["write_s"]
    return {
        "wait": stamps["job_started"] - acknowledged,
        "load": stages["load_s"], "segment": stages["segment_s"], "write": stages["write_s"],
        "send": stamps["rtstruct_delivered"] - written,
        "total": stamps["rtstruct_delivered"] - acknowledged,
    }, peer_send


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--quiet", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"series: {args.slices} slices of 512x512, quiet_period_s {args.quiet:g}, "
          f"{args.runs} runs each, classical engine, default protocol; medians")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        plain = tmp_path / "plain"
        write_phantom(plain, slices=args.slices)
        counted = tmp_path / "counted"
        counted.mkdir()
        for path in sorted(plain.iterdir()):
            ds = pydicom.dcmread(path)
            ds.ImagesInAcquisition = args.slices
            ds.save_as(counted / path.name, enforce_file_format=True)
        for name, series in (("count evidence (complete at release)", counted),
                             ("quiet period (no count evidence)", plain)):
            runs, peers = [], []
            for k in range(args.runs):
                stages, peer = one_run(series, tmp_path / f"{series.name}-{k}", args.quiet)
                runs.append(stages)
                peers.append(peer)
            median = {s: statistics.median(r[s] for r in runs) for s in STAGES}
            peer = statistics.median(peers)
            print(f"\n{name}:")
            for stage in STAGES:
                values = ", ".join(f"{r[stage]:.2f}" for r in runs)
                print(f"  {stage:<8} {median[stage]:6.2f} s   (runs: {values})")
            print(f"  peer: storescu sending the same RTSTRUCT {peer:.2f} s; "
                  f"ratio our send stage / storescu: {median['send'] / peer:.2f}")


if __name__ == "__main__":
    main()
