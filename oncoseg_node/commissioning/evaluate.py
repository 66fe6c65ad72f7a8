"""Commissioning metrics: our contours against the institution's reference contours.

Volumetric Dice on the voxel grid; surface Dice, mean surface distance and
HD95 on area-weighted surface elements in patient millimetres, each slice
placed by its own geometry (see :mod:`oncoseg_node.commissioning.surface`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from oncoseg_node.commissioning.surface import bounding_box, surface_scores
from oncoseg_node.contouring.mask_crop import MaskCrop
from oncoseg_node.contouring.volume import Volume


@dataclass(frozen=True)
class StructureMetrics:
    case: str
    structure: str
    dice: float
    hd95_mm: float
    msd_mm: float
    surface_dice: float
    volume_ours_cc: float
    volume_reference_cc: float

    @property
    def volume_difference_cc(self) -> float:
        return self.volume_ours_cc - self.volume_reference_cc


def compare(volume: Volume, ours: np.ndarray, reference: np.ndarray, *, case: str = "",
            structure: str = "", tolerance_mm: float = 2.0) -> StructureMetrics:
    """All metrics for one structure (definitions in :mod:`.surface`).

    Distances are inf and surface Dice 0 when exactly one mask is empty.
    """
    box = bounding_box(ours | reference)
    if box is None:  # neither mask has a voxel: nothing to disagree about
        return StructureMetrics(case, structure, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0)
    # everything below runs on the crop: most organs fill a small part of the volume
    a, b = ours[box], reference[box]
    per_voxel_mm3 = volume.voxel_volume_mm3[box[0]]
    count_a = a.reshape(len(a), -1).sum(axis=1)
    count_b = b.reshape(len(b), -1).sum(axis=1)
    overlap = int(np.logical_and(a, b).sum())
    dice = 2.0 * overlap / int(count_a.sum() + count_b.sum())
    scores = surface_scores(volume, a, b, tolerance_mm=tolerance_mm, box=box)
    return StructureMetrics(case, structure, float(dice), scores.hd95_mm, scores.msd_mm,
                            scores.surface_dice, float(count_a @ per_voxel_mm3 / 1000.0),
                            float(count_b @ per_voxel_mm3 / 1000.0))


def compare_sets(volume: Volume, ours: Mapping[str, np.ndarray | MaskCrop],
                 reference: Mapping[str, np.ndarray | MaskCrop], *, case: str = "",
                 aliases: Mapping[str, str] | None = None,
                 tolerance_mm: float = 2.0) -> list[StructureMetrics]:
    """Match structures by TG-263 name (reference names mapped through ``aliases``).

    Masks may be crops: surface distances need whole arrays, so each pair is
    made full only while it is compared.
    """
    aliases = aliases or {}
    renamed = {aliases.get(name, name): mask for name, mask in reference.items()}
    return [compare(volume, _full(volume, ours.get(name)), _full(volume, renamed[name]),
                    case=case, structure=name, tolerance_mm=tolerance_mm)
            for name in sorted(renamed)]


def _full(volume: Volume, mask: np.ndarray | MaskCrop | None) -> np.ndarray:
    if mask is None:
        return np.zeros(volume.shape, dtype=bool)
    return mask.full() if isinstance(mask, MaskCrop) else mask


def aggregate(rows: Sequence[StructureMetrics]) -> list[dict[str, Any]]:
    """Per structure over cases: median and interquartile range of each metric."""
    out = []
    for name in sorted({r.structure for r in rows}):
        subset = [r for r in rows if r.structure == name]
        entry: dict[str, Any] = {"structure": name, "cases": len(subset)}
        for metric in ("dice", "hd95_mm", "msd_mm", "surface_dice", "volume_difference_cc"):
            values = np.array([getattr(r, metric) for r in subset], dtype=float)
            q1, median, q3 = np.percentile(values, [25, 50, 75])
            entry[metric] = (float(median), float(q1), float(q3))
        out.append(entry)
    return out
