"""Peak memory of the receiving daemon beside DCMTK storescp, same files, same run.

Two loads: one ~1 GiB CT instance (16384 x 32768, 16 bit) and a 1,000-slice
512x512 series, each sent by DCMTK storescu. Peak RSS is the kernel's VmHWM
of the receiving process. The node refuses the 1 GiB matrix once it has
arrived (no CT is over 4096 x 4096), storescp stores it: both have received
every byte. Run: python -m bench.memory
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pydicom

from bench.rtstruct_write import machine
from oncoseg_node.commissioning.phantom import write_phantom
from tests.conftest import write_config
from tests.ctfactory import ct_slice
from tests.daemon import Daemon
from tests.peers import DCMTK_ENV, require, start_listening


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def send(target: Path, port: int, called: str) -> None:
    """Send with storescu; the node's refusal of a matrix no CT has still costs the receive."""
    args = [require("storescu"), "-aec", called, "127.0.0.1", str(port)]
    if target.is_dir():
        args[1:1] = ["--scan-directories"]
    done = subprocess.run([*args, str(target)], env=DCMTK_ENV, capture_output=True, text=True,
                          timeout=900)
    if done.returncode != 0 and target.is_dir():
        raise SystemExit(f"storescu to {called} failed: {done.stderr[-500:]}")


def measure(name: str, target: Path, tmp: Path) -> None:
    run = tmp / f"node-{name}"
    run.mkdir()
    config = write_config(run, series={"quiet_period_s": 600}, http={"enabled": False})
    daemon = Daemon(config, 0, run / "daemon.log").start()
    try:
        before = peak_rss_mib(daemon.proc.pid)
        send(target, daemon.port, "ONCOSEG")
        ours = peak_rss_mib(daemon.proc.pid)
    finally:
        daemon.kill()
    out = tmp / f"scp-{name}"
    out.mkdir()

    def launch(ports: list[int]) -> subprocess.Popen:
        return subprocess.Popen([require("storescp"), "-od", str(out), str(ports[0])],
                                env=DCMTK_ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    scp, (scp_port,) = start_listening(launch, "storescp")
    try:
        send(target, scp_port, "ANY")
        theirs = peak_rss_mib(scp.pid)
    finally:
        scp.kill()
        scp.wait()
    print(f"{name}: oncoseg-node peak RSS {ours:.0f} MiB (idle {before:.0f} MiB), "
          f"storescp {theirs:.0f} MiB, ratio {ours / theirs:.1f}")


def main() -> None:
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        big = ct_slice(series_uid="1.2.826.0.1.3680043.10.7", study_uid="1.2.826.0.1.3680043.10.8",
                       frame_uid="1.2.826.0.1.3680043.10.9", index=0, size=16)
        big.Rows, big.Columns = 16384, 32768
        big.PixelData = np.zeros((16384, 32768), dtype=np.uint16).tobytes()
        pydicom.dcmwrite(tmp_path / "big.dcm", big, enforce_file_format=True)
        del big
        measure("1 GiB instance", tmp_path / "big.dcm", tmp_path)
        write_phantom(tmp_path / "series", slices=1000)
        measure("1000-slice series", tmp_path / "series", tmp_path)


if __name__ == "__main__":
    main()
