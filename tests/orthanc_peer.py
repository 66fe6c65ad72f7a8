"""A real Orthanc (Debian package) on loopback, for tests that need a PACS/TPS peer.

Each instance gets its own temporary storage, ephemeral DICOM and HTTP ports,
no remote access and no authentication; it is started with TCP_NODELAY=1.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.peers import DCMTK_ENV, free_port, require, stop_process, wait_for_port


@dataclass
class Orthanc:
    aet: str
    dicom_port: int
    http_port: int
    workdir: Path
    pid: int = 0  # the server process (the receive bench reads its CPU time)

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}",
                                    timeout=10) as response:
            return json.loads(response.read())


@contextmanager
def orthanc(workdir: Path, *, aet: str = "ORTHANC",
            modalities: dict[str, tuple[str, str, int]] | None = None,
            sync_storage: bool = True) -> Iterator[Orthanc]:
    """Start Orthanc; ``modalities`` are the peers it may talk back to
    (name -> (AET, host, port)), needed for Storage Commitment reports."""
    workdir.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_port(), free_port()
    config = {
        "Name": "oncoseg-test",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "SyncStorageArea": sync_storage,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "DicomModalities": {k: list(v) for k, v in (modalities or {}).items()},
        "Plugins": [],
        "StableAge": 1,
    }
    (workdir / "orthanc.json").write_text(json.dumps(config))
    log = (workdir / "orthanc.log").open("wb")
    proc = subprocess.Popen([require("Orthanc"), str(workdir / "orthanc.json")],
                            env=DCMTK_ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(dicom_port, 30)
        wait_for_port(http_port, 30)
        peer = Orthanc(aet, dicom_port, http_port, workdir, proc.pid)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the REST API answers once the index is open
            try:
                peer.get("/system")
                break
            except OSError:
                time.sleep(0.1)
        yield peer
    finally:
        stop_process(proc, grace=10)
