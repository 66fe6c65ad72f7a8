"""The classical engine's speed and accuracy on a 150-slice 512x512 phantom.

Target: every structure of a thorax CT in under 5 s on the 2-core machine.
The floor printed beside it is one numpy threshold of the same volume, what
any HU-based method pays at least. Also prints how long the phantom itself
takes (96 slices, the size the daemon tests send) and the box prompts.
Run: python -m bench.classical_speed [--slices 150] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.rtstruct_write import machine
from oncoseg_node.commissioning.phantom import make_phantom
from oncoseg_node.contouring.engines import classical
from oncoseg_node.contouring.engines.classical import ClassicalEngine
from oncoseg_node.contouring.engines.prompts import IntensityBoxPrompter
from oncoseg_node.contouring.protocols import Structure


def best_of(repeat: int, fn, *args) -> tuple[float, object]:
    """Shortest of ``repeat`` runs of ``fn(*args)`` in seconds, and its result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - started)
    return best, result


def prompt_boxes(prompter: IntensityBoxPrompter, volume) -> list:
    return [prompter(volume, Structure(n, (0, 0, 0))) for n in ("Lung_L", "Lung_R", "Bones")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=150)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    took, _ = best_of(args.repeat, make_phantom)
    print(f"phantom 96 x 512 x 512: {took:.2f} s")
    structures = [Structure(name, (0, 0, 0)) for name in ClassicalEngine.SUPPORTED]
    for position in ("HFS", "HFP", "FFS", "FFP"):
        phantom = make_phantom(slices=args.slices, patient_position=position)
        volume = phantom.volume
        ours, results = best_of(args.repeat, ClassicalEngine().segment, volume, structures)
        floor, _ = best_of(args.repeat, np.greater, volume.hu, -350.0)
        body = classical.external(volume)
        mid = classical.midlines(volume, body)
        stages = {
            "External": best_of(1, classical.external, volume)[0],
            "lungs": best_of(1, classical.lungs, volume, body, mid)[0],
            "bones+canal": best_of(1, classical.bones_and_canal, volume, body, mid)[0],
        }
        boxes, _ = best_of(1, prompt_boxes, IntensityBoxPrompter(defaults=True), volume)
        print(f"{position} {args.slices} x 512 x 512: {ours:.2f} s for {len(structures)} "
              f"structures (numpy threshold floor {floor:.3f} s, {ours / floor:.0f}x); "
              + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items())
              + f"; boxes for 3 structures {boxes:.2f} s")
        for result in results:  # type: ignore[union-attr]
            truth = phantom.truth[result.name]
            if result.absent:
                print(f"  {result.name:<12} absent")
                continue
            dice = 2 * np.logical_and(result.mask, truth).sum() / (result.mask.sum()
                                                                    + truth.sum())
            print(f"  {result.name:<12} Dice {dice:.4f}")


if __name__ == "__main__":
    main()
