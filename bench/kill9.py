"""kill -9 while receiving: nothing acknowledged is lost, and exactly one structure set
reaches the TPS, referencing every image, once the sender has resent what was not
acknowledged.

Each run starts the daemon with DCMTK storescp as the TPS, sends a 200-slice
phantom one instance at a time from a pynetdicom SCU (remembering which got
Success), kills the daemon with SIGKILL at a random moment, restarts it
after 1 s (even runs) or 30 s (odd runs), checks that every acknowledged
instance is on disk byte-identical and no partial file is visible, checks
that no structure set was sent from the part received (the series counts as
interrupted), then resends what was not acknowledged, as a scanner does, and
counts the structure sets the TPS holds. The peer for comparison is the count
itself: acknowledged versus stored, images sent versus images referenced.
Run: python -m bench.kill9 [--runs 20]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom

from bench.rtstruct_write import machine
from oncoseg_node.commissioning.phantom import make_phantom
from oncoseg_node.config import load_config
from oncoseg_node.intake.spool import TMP_SUFFIX, Spool
from oncoseg_node.ledger import Ledger
from tests.conftest import write_config
from tests.daemon import Daemon, wait_until
from tests.peers import storescp
from tests.test_intake_daemon import Sender

SLICES = 200
QUIET_S = 1.0


@dataclass
class RunResult:
    acknowledged: int
    identical: int
    partial: int
    premature: int
    resent: int
    structure_sets: int
    every_image: bool


def structure_sets(tps: Path) -> list[pydicom.Dataset]:
    found = []
    for path in sorted(tps.iterdir()) if tps.exists() else []:
        try:
            found.append(pydicom.dcmread(path))
        except Exception:  # noqa: BLE001 - storescp still writing it: ask again
            return []
    return found


def referenced(ds: pydicom.Dataset) -> set[str]:
    series = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0] \
        .RTReferencedSeriesSequence[0]
    return {item.ReferencedSOPInstanceUID for item in series.ContourImageSequence}


def one_run(directory: Path, datasets: list[pydicom.Dataset], rng: random.Random,
            down_s: float) -> RunResult:
    series_uid = str(datasets[0].SeriesInstanceUID)
    with storescp(directory / "tps") as tps_port:
        config = write_config(
            directory, series={"quiet_period_s": QUIET_S},
            destinations=[{"name": "tps", "ae_title": "TPS", "host": "127.0.0.1",
                           "port": tps_port, "retry": {"first_delay_s": 1, "max_delay_s": 2}}])
        daemon = Daemon(config, 0, directory / "daemon.log").start()
        cfg = load_config(config)
        sender = Sender(daemon.port, datasets)
        sender.start()
        time.sleep(rng.uniform(0.1, 1.5))
        daemon.kill()
        sender.join(timeout=60)
        spool = Spool(cfg.spool_dir)
        visible_partial = sum(
            1 for p in spool.objects.rglob("*.dcm")
            if len(pydicom.dcmread(p).PixelData) != len(datasets[0].PixelData))
        time.sleep(down_s)
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
            ledger.close()
            time.sleep(4 * QUIET_S)  # a node counting the part as whole would send it now
            premature = len(structure_sets(directory / "tps"))
            acked = {ds.SOPInstanceUID for ds in sender.acknowledged}
            resend = Sender(daemon.port, [ds for ds in datasets if ds.SOPInstanceUID not in acked])
            resend.run()
            wait_until(lambda: structure_sets(directory / "tps"), 180,
                       f"a structure set\n{daemon.log()}")
            time.sleep(3)  # nothing else may follow
            sets = structure_sets(directory / "tps")
        finally:
            daemon.stop()
    every_image = {str(ds.SOPInstanceUID) for ds in datasets}
    return RunResult(len(sender.acknowledged), identical, visible_partial + leftovers,
                     premature, len(resend.acknowledged), len(sets),
                     len(sets) == 1 and referenced(sets[0]) == every_image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=20261122)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    rng = random.Random(args.seed)
    datasets = make_phantom(slices=SLICES, rows=128, columns=128, pixel_spacing=(3.5, 3.5),
                            slice_thickness=2.0).datasets
    totals = {"acknowledged": 0, "identical": 0, "partial": 0, "premature": 0, "one": 0}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            directory = Path(tmp) / f"run{run}"
            directory.mkdir()
            down_s = 1.0 if run % 2 == 0 else 30.0
            r = one_run(directory, datasets, rng, down_s)
            totals["acknowledged"] += r.acknowledged
            totals["identical"] += r.identical
            totals["partial"] += r.partial
            totals["premature"] += r.premature
            totals["one"] += int(r.every_image)
            print(f"run {run + 1:2d} (down {down_s:2.0f} s): acknowledged "
                  f"{r.acknowledged:3d}, stored identical {r.identical:3d}, partial "
                  f"visible {r.partial}, sent before the resend {r.premature}, resent "
                  f"{r.resent:3d}, structure sets {r.structure_sets}, referencing all "
                  f"{SLICES}: {r.every_image}")
    print(f"total: {totals['identical']}/{totals['acknowledged']} acknowledged instances stored "
          f"byte-identical, {totals['partial']} partial files visible, "
          f"{totals['premature']} structure sets sent before the resend, "
          f"{totals['one']}/{args.runs} runs with exactly one structure set referencing "
          f"every image")


if __name__ == "__main__":
    main()
