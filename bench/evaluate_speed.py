"""`oncoseg-node evaluate` on a 96-slice thorax, beside DeepMind's surface-distance package.

The phantom thorax (96 slices of 512x512) and its truth as a reference
structure set are written once; then the whole command (``evaluate --series
--reference --ours``, comparing the structure set with a copy of itself:
start-up, CT and two structure sets read and rasterised, every metric) runs
as a subprocess and is timed. The peer is the surface-distance package
computing surface Dice, mean surface distance and HD95 on the same masks
(already rasterised: the peer is given less work). Prints both times, the
ratio and the machine. Target: evaluate under 5 s.
Run: python bench/evaluate_speed.py [--slices N]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
import surface_distance

from bench.rtstruct_write import machine
from oncoseg_node.commissioning.phantom import write_phantom
from oncoseg_node.commissioning.phantom_files import write_reference
from oncoseg_node.contouring.volume import load_series_dir
from oncoseg_node.rtstruct.reader import rasterize_rtstruct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=96)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        phantom = write_phantom(root / "ct", slices=args.slices)
        count = write_reference(phantom, root / "reference.dcm")
        shutil.copy(root / "reference.dcm", root / "ours.dcm")
        print(f"input: {args.slices} slices of 512x512, {count} structures")

        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "oncoseg_node.cli", "evaluate", "--series", str(root / "ct"),
             "--reference", str(root / "reference.dcm"), "--ours", str(root / "ours.dcm"),
             "--csv", str(root / "m.csv")], capture_output=True, text=True, timeout=600)
        ours = time.perf_counter() - started
        if proc.returncode:
            raise SystemExit(proc.stderr)
        print(f"oncoseg-node evaluate: {ours:.2f} s (whole command)")

        volume = load_series_dir(root / "ct")
        masks = rasterize_rtstruct(pydicom.dcmread(root / "reference.dcm"), volume)
        spacing = (float(abs(volume.slice_offsets[1] - volume.slice_offsets[0])),
                   *volume.pixel_spacing)
        started = time.perf_counter()
        for mask in masks.values():
            d = surface_distance.compute_surface_distances(mask, mask, spacing)
            surface_distance.compute_surface_dice_at_tolerance(d, 2.0)
            surface_distance.compute_average_surface_distance(d)
            surface_distance.compute_robust_hausdorff(d, 95)
        peer = time.perf_counter() - started
        print(f"surface-distance package, metrics only: {peer:.2f} s")
        print(f"ratio evaluate / peer: {ours / peer:.2f} (target: evaluate < 5 s: "
              f"{'met' if ours < 5 else 'NOT met'})")


if __name__ == "__main__":
    main()
