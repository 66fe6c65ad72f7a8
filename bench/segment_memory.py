"""Peak memory of ``oncoseg-node segment`` beside a plain pydicom + numpy read, same run.

The series is the thorax phantom (default 400 slices of 512 x 512, HFS),
contoured with the default config: classical engine, thorax protocol. The
peer reads the same files with pydicom and rescales them into one
preallocated float32 HU array, the floor any reader holding the series in
HU pays. Each runs as its own process; peak RSS is the kernel's ru_maxrss
for it (what ``/usr/bin/time -v`` prints as Maximum resident set size).
The phantom is written by a child too: a child's ru_maxrss starts from its
parent's RSS at fork, so this process stays small.
``--steps`` also prints, in this process, each engine step's peak above the
loaded volume (tracemalloc) and the process's VmHWM after it.
Target: segment <= 1.5 MiB a slice. Run: python -m bench.segment_memory
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from bench.rtstruct_write import machine

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "config" / "oncoseg-node.yaml"

PEER = """
import sys
from pathlib import Path
import numpy as np
import pydicom
paths = sorted(Path(sys.argv[1]).iterdir())
first = pydicom.dcmread(paths[0], stop_before_pixels=True)
hu = np.empty((len(paths), int(first.Rows), int(first.Columns)), dtype=np.float32)
for k, path in enumerate(paths):
    ds = pydicom.dcmread(path)
    np.multiply(ds.pixel_array, float(ds.RescaleSlope), out=hu[k], casting="unsafe")
    hu[k] += float(ds.RescaleIntercept)
print(float(hu.mean()))
"""


def peak_rss_mib(args: list[str]) -> tuple[float, float]:
    """Run ``args``; (peak RSS in MiB, wall seconds). Raises on failure."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    took = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        assert proc.stderr is not None
        raise SystemExit(f"{args[2:4]} failed: {proc.stderr.read().decode()[-800:]}")
    return usage.ru_maxrss / 1024, took


def hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def steps(series: Path) -> None:
    """Each engine step's tracemalloc peak above what was held before it, in this process."""
    from oncoseg_node.contouring.engines.classical.engine import _Steps
    from oncoseg_node.contouring.pipeline import load_ct_series

    tracemalloc.start()
    volume, _ = load_ct_series(sorted(series.iterdir()))
    print(f"  load: {tracemalloc.get_traced_memory()[0] / 2**20:.0f} MiB held, "
          f"VmHWM {hwm_mib():.0f} MiB")
    found = _Steps(volume)
    for name in ("body", "mid", "chest", "skeleton"):
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        getattr(found, name)
        held, peak = tracemalloc.get_traced_memory()
        print(f"  {name:<9} peak +{(peak - before) / 2**20:4.0f} MiB, "
              f"kept +{(held - before) / 2**20:4.0f} MiB, VmHWM {hwm_mib():.0f} MiB")
    tracemalloc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=400)
    parser.add_argument("--steps", action="store_true", help="also each engine step")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        series, out = Path(tmp) / "series", Path(tmp) / "out"
        out.mkdir()
        peak_rss_mib([sys.executable, "-m", "oncoseg_node.cli", "phantom", str(series),
                      "--slices", str(args.slices)])
        ours, took = peak_rss_mib([sys.executable, "-m", "oncoseg_node.cli", "segment",
                                   str(series), "-o", str(out), "--protocol", "thorax",
                                   "--config", str(CONFIG)])
        peer, peer_took = peak_rss_mib([sys.executable, "-c", PEER, str(series)])
        n = args.slices
        print(f"segment {n} x 512 x 512: peak RSS {ours:.0f} MiB = {ours / n:.2f} MiB a slice "
              f"({took:.1f} s; target <= 1.5 MiB a slice = {1.5 * n:.0f} MiB)")
        print(f"peer pydicom + numpy read into one float32 array: {peer:.0f} MiB = "
              f"{peer / n:.2f} MiB a slice ({peer_took:.1f} s)")
        print(f"ratio segment / peer: {ours / peer:.2f}")
        if args.steps:
            steps(series)


if __name__ == "__main__":
    main()
