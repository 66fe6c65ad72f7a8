"""Seeded phantoms whose classical-engine masks are pinned by digest.

The cases cover the geometry the engine must treat alike (four patient
positions, slim and large patients, 0.68 mm pixels, non-uniform slice
spacing, gantry tilt) and the three sites. Each mask's digest is the SHA-256
of its bits on the whole grid, with its voxel count beside it so a change
says how far a structure moved. Run as a module to print the digests of the
code as it is now (``python -m tests.mask_cases``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from oncoseg_node.commissioning.phantom import make_phantom
from oncoseg_node.contouring.engines.classical.engine import ClassicalEngine
from oncoseg_node.contouring.protocols import Structure

DIGESTS = Path(__file__).parent / "fixtures" / "classical_mask_digests.json"
STRUCTURES = ("External", "Lung_L", "Lung_R", "Lungs", "Trachea", "Bronchus", "Bones",
              "SpinalCanal")
_SMALL: dict[str, Any] = {"slices": 48, "rows": 320, "columns": 320,
                          "pixel_spacing": (1.25, 1.25)}
_NON_UNIFORM = [float(x) for x in np.concatenate([np.arange(0, 60, 2.0),
                                                  np.arange(60, 120, 3.0),
                                                  np.arange(120, 165, 5.0)])]
CASES: dict[str, dict[str, Any]] = {
    "thorax-HFS": {**_SMALL, "seed": 11},
    "thorax-HFP": {**_SMALL, "patient_position": "HFP", "seed": 12},
    "thorax-FFS": {**_SMALL, "patient_position": "FFS", "seed": 13},
    "thorax-FFP": {**_SMALL, "patient_position": "FFP", "seed": 14},
    "thorax-slim": {**_SMALL, "variant": "slim", "seed": 15},
    "thorax-large": {**_SMALL, "variant": "large", "rows": 400, "columns": 400, "seed": 16},
    "thorax-0.68mm": {"slices": 32, "rows": 512, "columns": 512,
                      "pixel_spacing": (0.68, 0.68), "slice_thickness": 2.0, "seed": 17},
    "thorax-non-uniform": {"rows": 320, "columns": 320, "pixel_spacing": (1.25, 1.25),
                           "slice_offsets": _NON_UNIFORM, "seed": 18},
    "thorax-tilt": {**_SMALL, "gantry_tilt_deg": 10.0, "seed": 19},
    "pelvis": {**_SMALL, "site": "pelvis", "seed": 20},
    "head": {"slices": 40, "rows": 256, "columns": 256, "pixel_spacing": (1.0, 1.0),
             "site": "head", "seed": 21},
}


def digest(mask: np.ndarray | None) -> str:
    """``count:sha256`` of the mask's bits on the whole grid ("absent" when not found)."""
    if mask is None or not mask.any():
        return "absent"
    bits = np.packbits(np.ascontiguousarray(mask, dtype=bool))
    return f"{int(mask.sum())}:{hashlib.sha256(bits.tobytes()).hexdigest()[:20]}"


def case_masks(name: str) -> dict[str, np.ndarray | None]:
    phantom = make_phantom(**CASES[name])
    results = ClassicalEngine().segment(phantom.volume,
                                        [Structure(s, (0, 0, 0)) for s in STRUCTURES])
    return {r.name: r.mask for r in results}


def case_digests(name: str) -> dict[str, str]:
    return {structure: digest(mask) for structure, mask in case_masks(name).items()}


def _dice(a: np.ndarray | None, b: np.ndarray | None) -> float:
    a = np.zeros(0, bool) if a is None else a
    b = np.zeros(0, bool) if b is None else b
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def main() -> None:
    """Write the digests; ``--save F.npz`` also keeps the masks, ``--dice F.npz`` prints,
    for each structure that moved since F was saved, its Dice against it."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--save", type=Path)
    parser.add_argument("--dice", type=Path)
    args = parser.parse_args()
    masks = {name: case_masks(name) for name in CASES}
    out = {name: {s: digest(m) for s, m in found.items()} for name, found in masks.items()}
    DIGESTS.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    if args.save:
        np.savez_compressed(args.save, **{f"{n}/{s}": m for n, found in masks.items()
                                          for s, m in found.items() if m is not None})
    if args.dice:
        before = np.load(args.dice)
        for name, found in masks.items():
            for s, m in found.items():
                old = before.get(f"{name}/{s}", None)
                if digest(old) != digest(m):
                    print(f"{name} {s}: Dice {_dice(old, m):.4f} "
                          f"({0 if old is None else int(old.sum())} -> "
                          f"{0 if m is None else int(m.sum())} voxels)")


if __name__ == "__main__":
    main()
