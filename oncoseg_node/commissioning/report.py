"""Evaluation reports: a terminal table, a CSV and a self-contained HTML page.

Every row names its case's identity (patient ID, series UID and
description, files, node and protocol versions; see
:class:`~oncoseg_node.commissioning.cases.CaseIdentity`), so a number can be
traced to the data and software that produced it. The HTML page plots each
structure's distribution over cases (one dot per case on every metric's
axis, with the median marked) in inline SVG: no script, no network.
"""

from __future__ import annotations

import csv
import html
import io
import math
from collections.abc import Sequence
from dataclasses import asdict, fields

from oncoseg_node.commissioning.cases import CaseIdentity, CaseResult
from oncoseg_node.commissioning.evaluate import StructureMetrics, aggregate

METRICS = (  # attribute, column title, axis range (None: from the data)
    ("dice", "Dice", (0.0, 1.0)),
    ("surface_dice", "surface Dice", (0.0, 1.0)),
    ("hd95_mm", "HD95 mm", None),
    ("msd_mm", "MSD mm", None),
    ("volume_difference_cc", "volume difference cc", None),
)
IDENTITY_FIELDS = [f.name for f in fields(CaseIdentity) if f.name != "case"]


def _rows(results: Sequence[CaseResult]) -> list[tuple[CaseIdentity, StructureMetrics]]:
    return [(result.identity, row) for result in results for row in result.rows]


def to_csv(results: Sequence[CaseResult]) -> str:
    """One line per case and structure: the metrics, then the case's identity."""
    buffer = io.StringIO()
    metric_fields = [*StructureMetrics.__dataclass_fields__, "volume_difference_cc"]
    writer = csv.DictWriter(buffer, fieldnames=[*metric_fields, *IDENTITY_FIELDS])
    writer.writeheader()
    for identity, row in _rows(results):
        ident = asdict(identity)
        writer.writerow({**asdict(row), "volume_difference_cc": row.volume_difference_cc,
                         **{k: ident[k] for k in IDENTITY_FIELDS}})
    return buffer.getvalue()


def to_table(results: Sequence[CaseResult]) -> str:
    lines = []
    for result in results:
        i = result.identity
        lines.append(f"case {i.case}: patient {i.patient_id}, series {i.series_description!r} "
                     f"{i.series_uid}, node {i.node_version}, protocol {i.protocol}")
    lines.append(f"{'case':<12} {'structure':<16} {'Dice':>6} {'HD95 mm':>8} {'MSD mm':>7} "
                 f"{'sDSC 2mm':>8} {'dV cc':>8}")
    for _, r in _rows(results):
        lines.append(f"{r.case[:12]:<12} {r.structure[:16]:<16} {r.dice:6.3f} {r.hd95_mm:8.2f} "
                     f"{r.msd_mm:7.2f} {r.surface_dice:8.3f} {r.volume_difference_cc:8.1f}")
    return "\n".join(lines)


def aggregate_lines(results: Sequence[CaseResult]) -> list[str]:
    """Per structure over cases: median [interquartile range] of Dice and HD95."""
    lines = []
    for entry in aggregate([row for _, row in _rows(results)]):
        d, h = entry["dice"], entry["hd95_mm"]
        lines.append(f"  {entry['structure']:<16} n={entry['cases']}  Dice {d[0]:.3f} "
                     f"[{d[1]:.3f}-{d[2]:.3f}]  HD95 {h[0]:.2f} [{h[1]:.2f}-{h[2]:.2f}] mm")
    return lines


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _axis_range(values: list[float], fixed: tuple[float, float] | None) -> tuple[float, float]:
    if fixed:
        return fixed
    finite = [v for v in values if math.isfinite(v)] or [0.0]
    lo, hi = min(finite + [0.0]), max(finite)
    return (lo, hi if hi > lo else lo + 1.0)


def _strip(values: list[float], cases: list[str], span: tuple[float, float]) -> str:
    """One metric of one structure: a dot per case on a 200-pixel axis, the median as a bar."""
    lo, hi = span
    width, left = 200, 4

    def x(v: float) -> float:
        return left + width * (min(max(v, lo), hi) - lo) / (hi - lo)

    marks = [f'<line x1="{left}" y1="14" x2="{left + width}" y2="14" stroke="#999"/>']
    for value, case in zip(values, cases, strict=True):
        if math.isfinite(value):
            marks.append(f'<circle cx="{x(value):.1f}" cy="14" r="4" fill="#2a6f97" '
                         f'fill-opacity="0.7"><title>{_e(case)}: {value:.3f}</title></circle>')
        else:  # a missing structure: drawn past the end of the axis
            marks.append(f'<text x="{left + width + 2}" y="18" font-size="11" fill="#a00">'
                         f'<title>{_e(case)}: no surface</title>inf</text>')
    finite = sorted(v for v in values if math.isfinite(v))
    if finite:
        median = finite[len(finite) // 2] if len(finite) % 2 else \
            (finite[len(finite) // 2 - 1] + finite[len(finite) // 2]) / 2
        marks.append(f'<line x1="{x(median):.1f}" y1="5" x2="{x(median):.1f}" y2="23" '
                     f'stroke="#c0392b" stroke-width="2"/>')
    marks.append(f'<text x="{left}" y="34" font-size="10">{lo:g}</text>'
                 f'<text x="{left + width}" y="34" font-size="10" text-anchor="end">{hi:.3g}'
                 "</text>")
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + 30}" height="38" '
            f'role="img">{"".join(marks)}</svg>')


def _distribution_table(results: Sequence[CaseResult]) -> str:
    rows = [row for _, row in _rows(results)]
    head = "".join(f"<th>{_e(title)}</th>" for _, title, _ in METRICS)
    body = []
    for name in sorted({r.structure for r in rows}):
        subset = [r for r in rows if r.structure == name]
        cells = []
        for attribute, _, fixed in METRICS:
            values = [float(getattr(r, attribute)) for r in subset]
            span = _axis_range([float(getattr(r, attribute)) for r in rows], fixed)
            cells.append(f"<td>{_strip(values, [r.case for r in subset], span)}</td>")
        body.append(f"<tr><th>{_e(name)}<br><small>{len(subset)} case(s)</small></th>"
                    f"{''.join(cells)}</tr>")
    return f"<table class='dist'><tr><th>structure</th>{head}</tr>{''.join(body)}</table>"


def to_html(results: Sequence[CaseResult], title: str = "oncoseg-node evaluation") -> str:
    """A self-contained report: the cases, each structure's distribution, every number."""
    case_head = "".join(f"<th>{_e(h)}</th>" for h in ("case", *IDENTITY_FIELDS))
    case_rows = "".join(
        "<tr>" + "".join(f"<td>{_e(v)}</td>" for v in asdict(r.identity).values()) + "</tr>"
        for r in results)
    header = "".join(f"<th>{h}</th>" for h in ("case", "patient", "structure", "Dice", "HD95 mm",
                                                "MSD mm", "surface Dice 2 mm", "volume ours cc",
                                                "volume reference cc", "difference cc"))
    body = "".join(
        f"<tr><td>{_e(r.case)}</td><td>{_e(i.patient_id)}</td><td>{_e(r.structure)}</td>"
        f"<td>{r.dice:.3f}</td><td>{r.hd95_mm:.2f}</td><td>{r.msd_mm:.2f}</td>"
        f"<td>{r.surface_dice:.3f}</td><td>{r.volume_ours_cc:.1f}</td>"
        f"<td>{r.volume_reference_cc:.1f}</td><td>{r.volume_difference_cc:.1f}</td></tr>"
        for i, r in _rows(results))
    style = ("body{font:14px system-ui,sans-serif;margin:16px} table{border-collapse:collapse;"
             "margin-bottom:16px} th,td{border:1px solid #ccc;padding:2px 6px;text-align:left}"
             " .dist td{padding:0 4px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{style}</style></head><body><h1>{_e(title)}</h1>"
            f"<h2>Cases</h2><table><tr>{case_head}</tr>{case_rows}</table>"
            "<h2>Distribution over cases</h2><p>One dot per case; the red bar is the median. "
            "Surface Dice at 2 mm; definitions in the README.</p>"
            f"{_distribution_table(results)}"
            f"<h2>All metrics</h2><table><tr>{header}</tr>{body}</table></body></html>")
