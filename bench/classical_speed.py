"""The classical engine's speed and accuracy on a 150-slice 512x512 phantom.

Target: all structures of a thorax CT in under 5 s on a 2-core machine.
The peer measured in the same run is a plain threshold of the same volume
(numpy only), the floor any HU-based method pays. Run: python bench/classical_speed.py
"""

from __future__ import annotations

import time

import numpy as np

from bench.rtstruct_write import machine
from oncoseg_node.engines.classical import ClassicalEngine
from oncoseg_node.phantom import make_phantom
from oncoseg_node.protocols import Structure


def main() -> None:
    print(f"machine: {machine()}")
    for position in ("HFS", "FFP"):
        phantom = make_phantom(slices=150, patient_position=position)
        structures = [Structure(name, (0, 0, 0)) for name in ClassicalEngine.SUPPORTED]
        started = time.perf_counter()
        results = ClassicalEngine().segment(phantom.volume, structures)
        ours = time.perf_counter() - started
        started = time.perf_counter()
        _ = (phantom.volume.hu > -350) & (phantom.volume.hu < 3000)
        floor = time.perf_counter() - started
        print(f"{position}: {ours:.2f} s for {len(structures)} structures "
              f"(one numpy threshold of the volume: {floor:.3f} s, ratio {ours / floor:.0f}x)")
        for result in results:
            truth = phantom.truth.get(result.name)
            if result.absent or truth is None:
                print(f"  {result.name:<12} absent")
                continue
            dice = 2 * np.logical_and(result.mask, truth).sum() / (result.mask.sum() + truth.sum())
            print(f"  {result.name:<12} Dice {dice:.4f}")


if __name__ == "__main__":
    main()
