"""What a C-STORE must carry before the node answers Success, and duplicates under load.

Every malformed instance gets its own named status and an ErrorComment, and
leaves nothing in the spool or the ledger; five scanners sending the same
instances at once leave one row and one file per instance.
"""

from __future__ import annotations

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from oncoseg_node.dicom import status
from oncoseg_node.intake.handlers import StoreHandlers
from oncoseg_node.intake.spool import Spool
from oncoseg_node.intake.transport import Receiver
from oncoseg_node.ledger import Ledger
from tests.ctfactory import encode, series
from tests.peers import DCMTK_ENV, require


@pytest.fixture
def node(make_config):
    started: list[Receiver] = []

    def start(**series_overrides):
        cfg = make_config(series=series_overrides) if series_overrides else make_config()
        ledger = Ledger(cfg.ledger_path)
        spool = Spool(cfg.spool_dir)
        receiver = Receiver(cfg.node, StoreHandlers(cfg.node, cfg.series, spool, ledger))
        receiver.start()
        started.append(receiver)
        return receiver, ledger, spool

    yield start
    for receiver in started:
        receiver.stop_accepting()


def send(port: int, datasets: list[Dataset]) -> list[Dataset]:
    """C-STORE each dataset on one association; the response datasets."""
    ae = AE(ae_title="CTSIM")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="ONCOSEG")
    assert assoc.is_established
    try:
        return [assoc.send_c_store(ds) for ds in datasets]
    finally:
        assoc.release()


def assert_nothing_kept(ledger: Ledger, spool: Spool) -> None:
    assert spool.all_relpaths() == set()
    assert not list(spool.objects.rglob("*.tmp*"))
    assert ledger.open_series() == []
    assert ledger.jobs() == []


def storescu_statuses(files: list[Path], port: int) -> list[str]:
    """Run storescu and return the status word of every Store response it logged."""
    proc = subprocess.run(
        [require("storescu"), "-v", "-aet", "CTSIM", "-aec", "ONCOSEG", "127.0.0.1",
         str(port), *map(str, files)],
        env=DCMTK_ENV, capture_output=True, text=True, timeout=180)
    return re.findall(r"Received Store Response \(([^)]*)\)", proc.stdout + proc.stderr)


def test_five_concurrent_senders_of_the_same_instances(node, tmp_path):
    receiver, ledger, spool = node()
    datasets = series(30)
    files = []
    for i, ds in enumerate(datasets):
        path = tmp_path / f"s{i:02d}.dcm"
        path.write_bytes(encode(ds))
        files.append(path)
    with ThreadPoolExecutor(max_workers=5) as pool:
        runs = list(pool.map(lambda _: storescu_statuses(files, receiver.port), range(5)))
    statuses = [s for run in runs for s in run]
    assert len(statuses) == 150 and set(statuses) == {"Success"}, statuses
    assert len(ledger.series_instances(str(datasets[0].SeriesInstanceUID))) == 30
    assert len(spool.all_relpaths()) == 30
    assert spool.all_relpaths() == ledger.known_relpaths()  # no orphan files
    (row,) = ledger.open_series()
    assert row["instance_count"] == 30
