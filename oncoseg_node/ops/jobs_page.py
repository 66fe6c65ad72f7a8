"""The pages a physicist reviews a day's work on: ``/jobs`` and ``/jobs/<id>``.

``/jobs`` is one table, newest first: state, patient, series, protocol,
seconds per stage, and every delivery with its attempts and next retry;
each row links to the job's page. ``/jobs/<id>`` holds the slice viewer
(every axial slice, coronal and sagittal views, window presets, each
structure toggled; see :mod:`.viewer` and :mod:`.viewer_script`), the
structure table with volumes, scores and flags, the geometry gate's
findings and any override, and links to download the structure set and the
QA picture.

Every value that came from DICOM or the ledger is HTML-escaped here.
"""

from __future__ import annotations

import html
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from oncoseg_node.ledger import Delivery, DeliveryState, Job, JobState
from oncoseg_node.ops.qa import LABEL_PX
from oncoseg_node.ops.viewer import WINDOWS, JobViewer
from oncoseg_node.ops.viewer_script import VIEWER_SCRIPT, VIEWER_STYLE

STAGES = ("load", "segment", "write")


@dataclass(frozen=True)
class JobView:
    """One job as the pages show it."""

    job: Job
    deliveries: Sequence[Delivery] = ()
    patient: dict[str, str] = field(default_factory=dict)
    has_snapshot: bool = False


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px; color: #1b1b1b; background: #f4f4f2; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 16px 0 6px; }
.note { color: #6b3b00; margin: 0 0 16px; }
.state { display: inline-block; padding: 1px 8px; border-radius: 9px; font-size: 12px;
  background: #ddd; }
.state-sent { background: #cfe9cf; } .state-delivering, .state-running, .state-queued {
  background: #d7e3f4; }
.state-held, .state-failed, .state-quarantined { background: #f6d3c9; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 12px; margin: 0 0 8px; }
dt { color: #555; } dd { margin: 0; word-break: break-all; }
img.qa { display: block; margin: 8px 0; max-width: 100%; height: auto;
  image-rendering: pixelated; }
table { border-collapse: collapse; background: #fff; }
th, td { text-align: left; padding: 3px 10px 3px 4px; border-bottom: 1px solid #e4e4e4;
  vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.flagged td { background: #fff1cc; }
.swatch { display: inline-block; width: 12px; height: 12px; border: 1px solid #555;
  vertical-align: -1px; }
.flag, .finding { color: #8a3b00; } .absent { color: #777; font-style: italic; }
ul.deliveries { margin: 0; padding-left: 16px; }
""" + VIEWER_STYLE


def _e(value: Any) -> str:
    """Escape any value for HTML text or a quoted attribute."""
    return html.escape("" if value is None else str(value), quote=True)


def when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _color_css(color: Any) -> str | None:
    """``rgb(r, g, b)`` for a stored colour, or None unless it is three ints in 0..255."""
    if (isinstance(color, (list, tuple)) and len(color) == 3
            and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255
                    for c in color)):
        return f"rgb({color[0]}, {color[1]}, {color[2]})"
    return None


def _state(state: str) -> str:
    return f'<span class="state state-{re.sub(r"[^a-z]", "", state.lower())}">{_e(state)}</span>'


def _patient_name(patient: dict[str, str]) -> str:
    name = patient.get("PatientName", "").replace("^", ", ", 1).replace("^", " ")
    return f"{name} ({patient['PatientID']})" if patient.get("PatientID") else name


def stage_text(job: Job) -> str:
    """Seconds per stage, e.g. ``load 1.2 s, segment 3.4 s, write 0.8 s``."""
    stages = job.stage_seconds or {}
    parts = [f"{name} {float(stages[name]):.1f} s" for name in STAGES
             if isinstance(stages.get(name), (int, float))]
    return ", ".join(parts) or "-"


def delivery_text(d: Delivery, now: float | None = None) -> str:
    """One delivery in words: its state, how many attempts it took, when it retries."""
    count = f"{d.attempts} attempt{'' if d.attempts == 1 else 's'}"
    if d.state == DeliveryState.DELIVERED:
        text = f"{d.destination}: delivered after {count}"
    elif d.state == DeliveryState.PENDING:
        retry = "now" if now is not None and d.next_attempt_at <= now else when(d.next_attempt_at)
        text = f"{d.destination}: pending, {count} so far, next attempt {retry}"
    else:
        text = f"{d.destination}: {d.state} after {count}"
    return text + (f" ({d.reason})" if d.reason and d.state != DeliveryState.DELIVERED else "")


def _deliveries(deliveries: Sequence[Delivery]) -> str:
    if not deliveries:
        return "-"
    now = time.time()
    return ('<ul class="deliveries">'
            + "".join(f"<li>{_e(delivery_text(d, now))}</li>" for d in deliveries) + "</ul>")


def _page(title: str, body: str, *, refresh: bool = False) -> str:
    meta = '<meta http-equiv="refresh" content="30">' if refresh else ""
    return ('<!doctype html>\n<html lang="en"><head><meta charset="utf-8">' + meta
            + f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>{body}"
            "</body></html>\n")


NOTE = ('<p class="note">Automatic drafts: every contour must be reviewed and approved in the '
        "planning system.")


def render_jobs_page(views: Sequence[JobView], *, title: str = "oncoseg-node") -> str:
    """``/jobs``: one row per job, newest first, linking to ``/jobs/<id>``."""
    rows = []
    for v in views:
        job, patient = v.job, v.patient
        rows.append(
            f'<tr><td><a href="/jobs/{job.id}">Job {job.id}</a><br>v{job.version}</td>'
            f"<td>{_state(job.state)}</td><td>{_e(_patient_name(patient))}</td>"
            f"<td>{_e(patient.get('SeriesDescription'))}<br><small>{_e(job.series_uid)}"
            f"</small></td><td>{_e(job.protocol or '-')}</td><td>{_e(when(job.created_at))}"
            f"</td><td>{_e(stage_text(job))}</td><td>{_deliveries(v.deliveries)}</td>"
            f"<td>{_e(job.reason or '')}</td></tr>")
    table = ("<table><tr><th>Job</th><th>State</th><th>Patient</th><th>Series</th>"
             "<th>Protocol</th><th>Series complete</th><th>Stage times</th><th>Deliveries</th>"
             "<th>Reason</th></tr>" + "".join(rows) + "</table>") if rows else \
        "<p>No jobs yet.</p>"
    return _page(f"{title}: recent jobs",
                 f"<h1>{_e(title)}: recent jobs</h1>{NOTE} Page generated "
                 f"{_e(when(time.time()))}.</p>\n{table}", refresh=True)


def _structure_rows(results: Sequence[dict[str, Any]]) -> str:
    rows = []
    for row in results:
        css = _color_css(row.get("color"))
        swatch = f'<span class="swatch" style="background: {css}"></span>' if css else ""
        flags = [str(f) for f in row.get("flags") or []]
        if row.get("absent"):
            volume = '<span class="absent">not found</span>'
        elif isinstance(row.get("volume_cc"), (int, float)):
            volume = f"{row['volume_cc']:.1f}"
        else:
            volume = "-"
        score = f"{row['score']:.2f}" if isinstance(row.get("score"), (int, float)) else "-"
        notes = [f'<span class="flag">{_e(f)}</span>' for f in flags]
        if row.get("note"):
            notes.append(f'<span class="absent">{_e(row["note"])}</span>')
        rows.append(
            f'<tr class="{"flagged" if flags else ""}"><td>{swatch}</td>'
            f'<td>{_e(row.get("name"))}</td><td class="num">{volume}</td>'
            f'<td class="num">{score}</td><td>{"<br>".join(notes) or "-"}</td></tr>')
    return ("<table><tr><th></th><th>Structure</th><th>Volume (cc)</th><th>Score</th>"
            "<th>Sanity flags</th></tr>" + "".join(rows) + "</table>")


def _viewer(job: Job, viewer: JobViewer) -> str:
    data = {"job": job.id, "counts": viewer.counts, "start": viewer.start, "window": "soft",
            "margin": LABEL_PX,
            "positions": {p: viewer.positions_mm(p) for p in viewer.counts},
            "structures": [s.name for s in viewer.structures]}
    # no "<" reaches the page raw, so no value (a structure name) can end or
    # re-open the block; JSON reads "\u003c" back as "<"
    payload = json.dumps(data).replace("<", "\\u003c")
    toggles = "".join(
        f'<label><input type="checkbox" class="structure" data-index="{i}" checked> '
        f'<span class="swatch" style="background: rgb{tuple(s.color)}"></span> {_e(s.name)}'
        "</label>" for i, s in enumerate(viewer.structures))
    options = "".join(f'<option value="{name}"{" selected" if name == "soft" else ""}>{name} '
                      f"(L {level:g} / W {width:g})</option>"
                      for name, (level, width) in WINDOWS.items())
    figures = []
    for plane, label in (("axial", "Axial"), ("coronal", "Coronal"), ("sagittal", "Sagittal")):
        n = viewer.counts[plane]
        figures.append(
            f'<figure><img id="{plane}" alt="{label} slice"><figcaption>{label}: '
            f'<span class="pos" id="{plane}-pos"></span><input type="range" '
            f'id="{plane}-slider" min="0" max="{n - 1}" value="{viewer.start[plane]}" '
            f'aria-label="{label} slice"></figcaption></figure>')
    return (f'<section class="viewer"><div class="controls">Window <select id="window">{options}'
            f"</select> &nbsp; {toggles}<br><small>Arrow keys and Page Up/Down move through the "
            "axial slices; Home and End jump to the first and last; a click on the axial "
            "slice moves the coronal and sagittal cuts there.</small></div>"
            f'{figures[0]}<div>{figures[1]}{figures[2]}</div></section>'
            f'<script type="application/json" id="viewer-data">{payload}</script>'
            f"<script>{VIEWER_SCRIPT}</script>")


def render_job_page(view: JobView, viewer: JobViewer | None, *,
                    title: str = "oncoseg-node") -> str:
    """``/jobs/<id>``: the viewer, the structures, the gate's findings and the downloads."""
    job, patient = view.job, view.patient
    facts = [
        ("State", _state(job.state)),
        ("Patient", _e(_patient_name(patient))),
        ("Series", _e(patient.get("SeriesDescription"))),
        ("Study date", _e(patient.get("StudyDate"))),
        ("Series UID", _e(job.series_uid)),
        ("Calling AE", _e(job.calling_ae)),
        ("Protocol", _e(f"{job.protocol} ({job.protocol_version})" if job.protocol else "")),
        ("Series complete", _e(when(job.created_at))),
        ("Contouring started", _e(when(job.started_at))),
        ("Finished", _e(when(job.finished_at))),
        ("Stage times", _e(stage_text(job))),
        ("Contouring attempts", _e(job.attempts)),
        ("Reason", _e(job.reason)),
    ]
    if job.override_finding:
        facts.append(("Geometry gate", '<span class="finding">released by an operator despite: '
                      f"{_e(job.override_finding)}</span>"))
    elif job.state == JobState.HELD and job.reason:
        facts.append(("Geometry gate", f'<span class="finding">{_e(job.reason)}</span>'))
    dl = "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in facts if v not in ("", "-"))
    links = []
    if job.rtstruct_relpath:
        links.append(f'<a href="/jobs/{job.id}/rtstruct.dcm" download>structure set (DICOM)</a>')
    if view.has_snapshot:
        links.append(f'<a href="/jobs/{job.id}/qa.png" download>QA picture (PNG)</a>')
    parts = [f'<p><a href="/jobs">&larr; all jobs</a></p><h1>Job {job.id} &middot; version '
             f"{job.version}</h1>{NOTE}</p><dl>{dl}</dl>",
             f"<p>Download: {' &middot; '.join(links)}</p>" if links else ""]
    if viewer is not None:
        parts.append(_viewer(job, viewer))
    elif job.rtstruct_relpath:
        parts.append('<p class="absent">The CT series or structure set is no longer stored '
                     "(retention), so there are no slices to show.</p>")
    if view.has_snapshot:
        parts.append(f'<img class="qa" src="/jobs/{job.id}/qa.png" alt="QA snapshot of job '
                     f'{job.id}: axial, coronal and sagittal planes with the contours">')
    if job.results:
        parts.append("<h2>Structures</h2>" + _structure_rows(job.results))
    parts.append(f"<h2>Deliveries</h2>{_deliveries(view.deliveries)}")
    return _page(f"{title}: job {job.id}", "\n".join(parts))
