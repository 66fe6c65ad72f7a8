"""The engine with and without the adapter on the held-out patients, side by side.

Both engines are built from the same configuration, the second with the new
adapter merged, and contour the validation cases with the same structures;
each is scored against the approved structure sets with ``evaluate``'s
metrics. The report says per structure whether the adapter helped, in one
CSV and one self-contained HTML page.
"""

from __future__ import annotations

import csv
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from oncoseg_node.commissioning.evaluate import StructureMetrics, compare_sets
from oncoseg_node.commissioning.finetune.cases import TrainingCase
from oncoseg_node.config import Sam3Config
from oncoseg_node.contouring.protocols import Structure

METRICS = ("dice", "hd95_mm", "surface_dice")


@dataclass(frozen=True)
class SideBySide:
    base: list[StructureMetrics]
    adapted: list[StructureMetrics]


def score(config: Sam3Config, cases: Sequence[TrainingCase],
          structures: Mapping[str, Structure]) -> list[StructureMetrics]:
    from oncoseg_node.contouring.engines.sam3.engine import Sam3Engine

    engine = Sam3Engine.from_config(config)
    wanted = [structures[name] for name in sorted(structures)]
    rows: list[StructureMetrics] = []
    for case in cases:
        results = engine.segment(case.volume, wanted)
        ours = {r.name: r.found_crop for r in results if not r.absent}
        rows += compare_sets(case.volume, ours, dict(case.masks), case=case.name)
    return rows


def side_by_side(config: Sam3Config, adapter_dir: Path, cases: Sequence[TrainingCase],
                 structures: Mapping[str, Structure]) -> SideBySide:
    return SideBySide(score(replace(config, adapter_dir=None), cases, structures),
                      score(replace(config, adapter_dir=adapter_dir), cases, structures))


def _medians(rows: Sequence[StructureMetrics]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name in sorted({r.structure for r in rows}):
        subset = [r for r in rows if r.structure == name]
        out[name] = {m: float(np.median([getattr(r, m) for r in subset])) for m in METRICS}
        out[name]["cases"] = float(len(subset))
    return out


def to_csv(report: SideBySide) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["case", "structure", *(f"{m}_base" for m in METRICS),
                     *(f"{m}_adapter" for m in METRICS)])
    adapted = {(r.case, r.structure): r for r in report.adapted}
    for row in report.base:
        other = adapted.get((row.case, row.structure))
        writer.writerow([row.case, row.structure, *(f"{getattr(row, m):.4f}" for m in METRICS),
                         *((f"{getattr(other, m):.4f}" for m in METRICS) if other else
                           ("",) * len(METRICS))])
    return buffer.getvalue()


def to_html(report: SideBySide, title: str, weights: Sequence[str] = ()) -> str:
    """The page; ``weights`` are lines naming what the adapter was trained over."""
    base, adapted = _medians(report.base), _medians(report.adapted)
    head = "".join(f"<th>{m} base</th><th>{m} adapter</th>" for m in METRICS)
    body = []
    for name in sorted(base):
        cells = []
        for metric in METRICS:
            b, a = base[name][metric], adapted.get(name, {}).get(metric, float("nan"))
            better = (a > b) if metric != "hd95_mm" else (a < b)
            style = ' style="background:#d8f0d8"' if better else ""
            cells.append(f"<td>{b:.3f}</td><td{style}>{a:.3f}</td>")
        body.append(f"<tr><td>{html.escape(name)}</td><td>{int(base[name]['cases'])}</td>"
                    f"{''.join(cells)}</tr>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            "</title><style>body{font-family:sans-serif}td,th{padding:4px 8px;"
            "border-bottom:1px solid #ccc;text-align:right}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>"
            + (f"<pre>{html.escape(chr(10).join(weights))}</pre>" if weights else "")
            + "<p>Medians over the validation patients; a green "
            "cell is where the adapter did better.</p><table><tr><th>structure</th>"
            f"<th>cases</th>{head}</tr>{''.join(body)}</table></body></html>")
