"""Each classical-engine step's memory at a fixed size, printed as JSON (run as a child).

``python -m tests.step_memory SLICES`` builds the seeded thorax phantom
(SLICES x 512 x 512), keeps only its volume, then runs each step of the
engine in turn and reports, per step, the tracemalloc peak above what was
held before it and the peak RSS above the RSS before it. The kernel's peak
(VmHWM) is reset before each step through ``/proc/self/clear_refs``, so
scipy's C buffers, which tracemalloc does not see, are counted too.
"""

from __future__ import annotations

import gc
import json
import sys
import tracemalloc
from pathlib import Path

from oncoseg_node.commissioning.phantom import make_phantom
from oncoseg_node.contouring.engines.classical.engine import _Steps

STEPS = ("body", "mid", "chest", "skeleton")


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(slices: int) -> dict[str, dict[str, float]]:
    volume = make_phantom(slices=slices, seed=7).volume
    gc.collect()
    steps = _Steps(volume)
    out: dict[str, dict[str, float]] = {}
    tracemalloc.start()
    for name in STEPS:
        gc.collect()
        rss_before = _kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        held_before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        getattr(steps, name)
        peak = tracemalloc.get_traced_memory()[1]
        out[name] = {"traced_peak_mib": (peak - held_before) / 2**20,
                     "rss_peak_mib": (_kib("VmHWM") - rss_before) / 1024}
    tracemalloc.stop()
    return out


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]))))
