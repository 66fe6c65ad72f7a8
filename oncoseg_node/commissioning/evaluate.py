"""Commissioning metrics: our contours against the institution's reference contours.

Distances are measured in mm in patient coordinates (LPS), with every
surface voxel mapped by its own slice's geometry, so anisotropic pixels and
non-uniform slice spacing are measured as they are. A mask's surface is its
voxels that touch the outside in-plane or through the slice above or below.
"""

from __future__ import annotations

import csv
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

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


def surface_points(volume: Volume, mask: np.ndarray) -> np.ndarray:
    """LPS coordinates (n, 3) of the mask's surface voxels."""
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1),
                                    border_value=0)
    surface = mask & ~eroded
    points = [volume.index_to_patient(int(z), *np.nonzero(surface[z]))
              for z in np.flatnonzero(surface.any(axis=(1, 2)))]
    return np.concatenate(points) if points else np.zeros((0, 3))


def compare(volume: Volume, ours: np.ndarray, reference: np.ndarray, *, case: str = "",
            structure: str = "", tolerance_mm: float = 2.0) -> StructureMetrics:
    """All metrics for one structure; distances are inf when either mask is empty."""
    dice = (2.0 * np.logical_and(ours, reference).sum() / (ours.sum() + reference.sum())
            if ours.any() or reference.any() else 1.0)
    a, b = surface_points(volume, ours), surface_points(volume, reference)
    if len(a) and len(b):
        d_ab = cKDTree(b).query(a)[0]
        d_ba = cKDTree(a).query(b)[0]
        both = np.concatenate([d_ab, d_ba])
        hd95 = float(np.percentile(both, 95))
        msd = float(both.mean())
        sdice = float(((d_ab <= tolerance_mm).sum() + (d_ba <= tolerance_mm).sum()) / len(both))
    else:
        hd95 = msd = float("inf")
        sdice = 0.0
    return StructureMetrics(case, structure, float(dice), hd95, msd, sdice,
                            volume.mask_volume_cc(ours), volume.mask_volume_cc(reference))


def compare_sets(volume: Volume, ours: Mapping[str, np.ndarray],
                 reference: Mapping[str, np.ndarray], *, case: str = "",
                 aliases: Mapping[str, str] | None = None,
                 tolerance_mm: float = 2.0) -> list[StructureMetrics]:
    """Match structures by TG-263 name (reference names mapped through ``aliases``)."""
    aliases = aliases or {}
    renamed = {aliases.get(name, name): mask for name, mask in reference.items()}
    empty = np.zeros(volume.shape, dtype=bool)
    return [compare(volume, ours.get(name, empty), renamed[name], case=case, structure=name,
                    tolerance_mm=tolerance_mm)
            for name in sorted(renamed)]


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


def to_csv(rows: Sequence[StructureMetrics]) -> str:
    buffer = io.StringIO()
    fields = [*StructureMetrics.__dataclass_fields__, "volume_difference_cc"]
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    for row in rows:
        writer.writerow({**asdict(row), "volume_difference_cc": row.volume_difference_cc})
    return buffer.getvalue()


def to_table(rows: Sequence[StructureMetrics]) -> str:
    lines = [f"{'case':<12} {'structure':<16} {'Dice':>6} {'HD95 mm':>8} {'MSD mm':>7} "
             f"{'sDSC 2mm':>8} {'dV cc':>8}"]
    for r in rows:
        lines.append(f"{r.case[:12]:<12} {r.structure[:16]:<16} {r.dice:6.3f} {r.hd95_mm:8.2f} "
                     f"{r.msd_mm:7.2f} {r.surface_dice:8.3f} {r.volume_difference_cc:8.1f}")
    return "\n".join(lines)


def to_html(rows: Sequence[StructureMetrics], title: str = "oncoseg-node evaluation") -> str:
    """A self-contained report: a Dice bar per structure (inline SVG) and the full table."""
    bars = []
    for i, r in enumerate(rows):
        width = max(r.dice, 0.0) * 400
        label = html.escape(f"{r.case} {r.structure}".strip())
        bars.append(f'<text x="0" y="{i * 22 + 15}" font-size="12">{label}</text>'
                    f'<rect x="220" y="{i * 22 + 3}" width="{width:.1f}" height="16" '
                    f'fill="#3a7"/><text x="{225 + width:.1f}" y="{i * 22 + 15}" '
                    f'font-size="12">{r.dice:.3f}</text>')
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="700" height="{len(rows) * 22 + 8}">'
           + "".join(bars) + "</svg>")
    header = "".join(f"<th>{h}</th>" for h in ("case", "structure", "Dice", "HD95 mm", "MSD mm",
                                                "surface Dice 2 mm", "volume ours cc",
                                                "volume reference cc", "difference cc"))
    body = "".join(
        f"<tr><td>{html.escape(r.case)}</td><td>{html.escape(r.structure)}</td>"
        f"<td>{r.dice:.3f}</td><td>{r.hd95_mm:.2f}</td><td>{r.msd_mm:.2f}</td>"
        f"<td>{r.surface_dice:.3f}</td><td>{r.volume_ours_cc:.1f}</td>"
        f"<td>{r.volume_reference_cc:.1f}</td><td>{r.volume_difference_cc:.1f}</td></tr>"
        for r in rows)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title></head><body><h1>{html.escape(title)}</h1><h2>Dice</h2>{svg}"
            f"<h2>All metrics</h2><table border='1'><tr>{header}</tr>{body}</table>"
            "</body></html>")
