"""RT Structure Set writing: oncoseg-node's writer beside rt-utils on the same masks.

30 ROIs over a 150-slice 512x512 phantom (the phantom's organs, repeated
under new names), written by both in the same run. Prints both times and the
ratio, and the machine. Run: python bench/rtstruct_write.py [--slices N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from oncoseg_node.commissioning.phantom import write_phantom
from oncoseg_node.rtstruct.profiles import PROFILES
from oncoseg_node.rtstruct.selfcheck import save_verified
from oncoseg_node.rtstruct.writer import GenerationInfo, RoiMask, build_rtstruct


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=150)
    parser.add_argument("--rois", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=5, help="runs of ours (median)")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        ct_dir = Path(tmp) / "ct"
        phantom = write_phantom(ct_dir, slices=args.slices)
        names = sorted(phantom.truth)
        rois = [RoiMask(f"{names[i % len(names)]}_{i}", (255, 0, 0), "ORGAN",
                        phantom.truth[names[i % len(names)]]) for i in range(args.rois)]
        contoured = sum(int(r.mask.any(axis=(1, 2)).sum()) for r in rois)
        print(f"input: {args.rois} ROIs, {args.slices} slices of 512x512, "
              f"{contoured} ROI-slices with contours")

        def ours(workers: int) -> tuple[float, float]:
            started = time.perf_counter()
            ds = build_rtstruct(phantom.volume, rois,
                                GenerationInfo("bench", "bench", "bench", "0"),
                                PROFILES["generic"], workers=workers)
            built = time.perf_counter() - started
            save_verified(ds, Path(tmp) / "ours.dcm", phantom.volume, PROFILES["generic"])
            return time.perf_counter() - started, built

        for label, workers in (("serial, 1 thread", 1), (f"{os.cpu_count()} threads",
                                                         os.cpu_count() or 1)):
            runs = [ours(workers) for _ in range(args.repeat)]
            total = statistics.median(r[0] for r in runs)
            built = statistics.median(r[1] for r in runs)
            print(f"oncoseg-node, {label}: median {total:.2f} s of {args.repeat} (build "
                  f"{built:.2f} s, encode + check + write {total - built:.2f} s; runs "
                  f"{', '.join(f'{r[0]:.2f}' for r in runs)})")
            if workers == 1:
                serial = total
        size = (Path(tmp) / "ours.dcm").stat().st_size
        print(f"file: {size / 1e6:.2f} MB")

        from rt_utils import RTStructBuilder

        started = time.perf_counter()
        rt = RTStructBuilder.create_new(dicom_series_path=str(ct_dir))
        order = {ds.SOPInstanceUID: k for k, ds in enumerate(phantom.datasets)}
        series_order = [order[s.SOPInstanceUID] for s in rt.series_data]
        for roi in rois:
            # rt-utils wants (rows, cols, slices) in its own slice order
            rt.add_roi(mask=np.moveaxis(roi.mask[series_order], 0, -1), color=list(roi.color),
                       name=roi.name)
        rt.save(str(Path(tmp) / "rtutils.dcm"))
        theirs = time.perf_counter() - started
        print(f"rt-utils 1.2.7: {theirs:.2f} s (build + write, no read back)")
        print(f"ratio rt-utils / oncoseg-node serial: {theirs / serial:.2f} "
              f"(> 1 means oncoseg-node is faster)")


if __name__ == "__main__":
    main()
