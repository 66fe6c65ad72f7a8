"""The classical engine's speed and accuracy on a 150-slice 512x512 phantom.

Target: every structure of a thorax CT in under 5 s on the 2-core machine.
The peer, measured in the same run on the same volume, is what a plain
scipy/scikit-image bone segmentation costs: one threshold, a 3D connected
component labelling and scikit-image's small-object removal; the ratio
printed is ours over the peer's. Also prints each structure's Dice against
the phantom's truth for each patient variant and position.
Run: python -m bench.classical_speed [--slices 150] [--repeat 2] [--positions HFS,FFP]
     [--variants standard,slim,large]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
from scipy import ndimage
from skimage import morphology

from bench.rtstruct_write import machine
from oncoseg_node.commissioning.phantom import make_phantom
from oncoseg_node.contouring.engines.classical import engine as classical
from oncoseg_node.contouring.engines.classical.blocks import Block
from oncoseg_node.contouring.engines.classical.engine import ClassicalEngine
from oncoseg_node.contouring.protocols import Structure


def best_of(repeat: int, fn: Callable[..., object], *args: object) -> tuple[float, object]:
    """Shortest of ``repeat`` runs of ``fn(*args)`` in seconds, and its result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - started)
    return best, result


def peer_bones(hu: np.ndarray) -> np.ndarray:
    """Threshold, label in 3D, drop small objects: the plain library way."""
    labels, _ = ndimage.label(hu > 200.0)
    return morphology.remove_small_objects(labels, max_size=63) > 0


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--slices", type=int, default=150)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--positions", default="HFS,FFP")
    parser.add_argument("--variants", default="standard,slim,large")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    structures = [Structure(name, (0, 0, 0)) for name in ClassicalEngine.SUPPORTED]
    for variant in args.variants.split(","):
        for position in args.positions.split(","):
            phantom = make_phantom(slices=args.slices, patient_position=position,
                                   variant=variant)
            volume = phantom.volume
            ours, results = best_of(args.repeat, ClassicalEngine().segment, volume, structures)
            peer, _ = best_of(args.repeat, peer_bones, volume.hu)
            body = classical.external(volume)
            mid = classical.midlines(volume, body)
            stages = {
                "External": best_of(1, classical.external, volume)[0],
                "lungs+airways": best_of(1, classical.LungsAndAirways, volume,
                                         Block.whole(body), mid)[0],
                "bones+canal": best_of(1, classical.bones_and_canal, volume, body, mid)[0],
            }
            print(f"{variant} {position} {args.slices} x 512 x 512: {ours:.2f} s for "
                  f"{len(structures)} structures; peer threshold+label+remove_small_objects "
                  f"{peer:.2f} s; ratio ours/peer {ours / peer:.2f}; "
                  + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()))
            dice = []
            for result in results:  # type: ignore[attr-defined]
                truth = phantom.truth[result.name]
                if result.absent:
                    dice.append(f"{result.name} absent")
                    continue
                both = np.logical_and(result.mask, truth).sum()
                dice.append(f"{result.name} {2 * both / (result.mask.sum() + truth.sum()):.3f}")
            print("  Dice: " + ", ".join(dice))


if __name__ == "__main__":
    main()
