"""kill -9 while receiving: nothing acknowledged is lost, the series is processed once.

Each run starts the daemon, sends 200 small CT instances one by one from a
pynetdicom SCU (remembering which got Success), kills the daemon with
SIGKILL at a random moment, restarts it, and checks that every acknowledged
instance is on disk byte-identical, no partial file is visible, and exactly
one job results. The peer for comparison is the count itself: acknowledged
versus stored. Run: python -m bench.kill9 [--runs 20]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import pydicom

from bench.rtstruct_write import machine
from oncoseg_node.config import load_config
from oncoseg_node.intake.spool import TMP_SUFFIX, Spool
from oncoseg_node.ledger import Ledger
from tests.conftest import write_config
from tests.ctfactory import ct_slice
from tests.daemon import Daemon, wait_until
from tests.peers import free_port
from tests.test_intake_daemon import Sender, jobs_for, settled


def one_run(directory: Path, rng: random.Random, index: int) -> tuple[int, int, int, bool]:
    """Returns (acknowledged, stored identical, partial files visible, exactly one job)."""
    port = free_port()
    config = write_config(directory, node={"port": port}, series={"quiet_period_s": 1})
    daemon = Daemon(config, port, directory / "daemon.log").start()
    cfg = load_config(config)
    series_uid = f"1.2.826.0.1.3680043.10.1{index}"
    datasets = [ct_slice(series_uid=series_uid, study_uid="1.2.826.0.1.3680043.10.2",
                         frame_uid="1.2.826.0.1.3680043.10.3", index=i, size=64)
                for i in range(200)]
    sender = Sender(port, datasets)
    sender.start()
    time.sleep(rng.uniform(0.1, 1.5))
    daemon.kill()
    sender.join(timeout=60)
    spool = Spool(cfg.spool_dir)
    visible_partial = sum(
        1 for p in spool.objects.rglob("*.dcm")
        if len(pydicom.dcmread(p).PixelData) != 64 * 64 * 2)
    daemon.start()
    try:
        ledger = Ledger(cfg.ledger_path)
        stored = {}
        for relpath in ledger.series_instances(series_uid):
            ds = pydicom.dcmread(spool.path(relpath))
            stored[ds.SOPInstanceUID] = ds
        identical = sum(1 for ds in sender.acknowledged
                        if ds.SOPInstanceUID in stored
                        and stored[ds.SOPInstanceUID] == ds
                        and stored[ds.SOPInstanceUID].PixelData == ds.PixelData)
        leftovers = len(list(spool.objects.rglob(f"*{TMP_SUFFIX}")))
        once = True
        if sender.acknowledged:
            wait_until(settled(daemon, series_uid), 60, "one job")
            time.sleep(2)
            once = len(jobs_for(daemon, series_uid)) == 1
        ledger.close()
    finally:
        daemon.stop()
    return len(sender.acknowledged), identical, visible_partial + leftovers, once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=20261122)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    rng = random.Random(args.seed)
    totals = [0, 0, 0, 0]
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            directory = Path(tmp) / f"run{run}"
            directory.mkdir()
            acked, identical, partial, once = one_run(directory, rng, run)
            totals[0] += acked
            totals[1] += identical
            totals[2] += partial
            totals[3] += int(once)
            print(f"run {run + 1:2d}: acknowledged {acked:3d}, stored identical {identical:3d}, "
                  f"partial visible {partial}, exactly one job: {once}")
    print(f"total: {totals[1]}/{totals[0]} acknowledged instances stored byte-identical, "
          f"{totals[2]} partial files visible, {totals[3]}/{args.runs} runs with exactly "
          "one job")


if __name__ == "__main__":
    main()
