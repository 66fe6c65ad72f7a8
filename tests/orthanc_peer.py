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

from tests.peers import DCMTK_ENV, require, start_listening, stop_process


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
    config: dict[str, Any] = {
        "Name": "oncoseg-test",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "DicomAet": aet,
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

    def launch(ports: list[int]) -> subprocess.Popen:
        config["DicomPort"], config["HttpPort"] = ports
        (workdir / "orthanc.json").write_text(json.dumps(config))
        with (workdir / "orthanc.log").open("ab") as log:
            return subprocess.Popen([require("Orthanc"), str(workdir / "orthanc.json")],
                                    env=DCMTK_ENV, stdout=log, stderr=subprocess.STDOUT)

    proc, (dicom_port, http_port) = start_listening(launch, f"Orthanc {aet}", count=2,
                                                    timeout=30)
    try:
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
