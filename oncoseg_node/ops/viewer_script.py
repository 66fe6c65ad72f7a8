"""The job page's only script, its style, and the Content Security Policy that admits them.

The script is a fixed string: the page's data travels in a JSON block
(``<script type="application/json">``, which browsers never run), and the
policy admits this script by its SHA-256 hash alone, so no markup that
came from DICOM can run code even if an escape were missed. Nothing is
fetched from anywhere but the node itself.
"""

from __future__ import annotations

import base64
import hashlib

VIEWER_SCRIPT = r"""
(function () {
  'use strict';
  var data = JSON.parse(document.getElementById('viewer-data').textContent);
  var planes = ['axial', 'coronal', 'sagittal'];
  var state = {window: data.window, hidden: {}};
  planes.forEach(function (p) { state[p] = data.start[p]; });

  function shown() {
    var out = [];
    for (var i = 0; i < data.structures.length; i++) { if (!state.hidden[i]) out.push(i); }
    return out.length ? out.join(',') : 'none';
  }
  function label(plane, i) {
    var mm = data.positions[plane][i].toFixed(1);
    var n = data.counts[plane];
    if (plane === 'axial') return 'slice ' + (i + 1) + ' of ' + n + ', z = ' + mm + ' mm';
    return (i + 1) + ' of ' + n + ', ' + (plane === 'coronal' ? 'y' : 'x') + ' = ' + mm + ' mm';
  }
  function draw(plane) {
    var img = document.getElementById(plane);
    var i = state[plane];
    img.dataset.pending = String(i);
    img.src = '/jobs/' + data.job + '/view/' + plane + '/' + i + '.png?window=' +
      state.window + '&show=' + shown();
    document.getElementById(plane + '-slider').value = String(i);
    document.getElementById(plane + '-pos').textContent = label(plane, i);
  }
  function go(plane, i) {
    state[plane] = Math.max(0, Math.min(data.counts[plane] - 1, i));
    draw(plane);
  }
  planes.forEach(function (p) {
    var img = document.getElementById(p);
    img.addEventListener('load', function () {
      img.dataset.loaded = img.dataset.pending;
      img.dataset.loadedSrc = img.src;  // which request finished, for automated checks
    });
    document.getElementById(p + '-slider').addEventListener('input', function (e) {
      go(p, parseInt(e.target.value, 10));
    });
    draw(p);
  });
  // A click on the axial slice moves the coronal and sagittal cuts through that point.
  document.getElementById('axial').addEventListener('click', function (e) {
    var img = e.currentTarget;
    var scale = img.naturalWidth / img.getBoundingClientRect().width;
    var col = Math.floor(e.offsetX * scale) - data.margin;
    var row = Math.floor(e.offsetY * scale) - data.margin;
    if (row < 0 || col < 0 || row >= data.counts.coronal || col >= data.counts.sagittal) return;
    go('coronal', row);
    go('sagittal', col);
  });
  document.addEventListener('keydown', function (e) {
    var tag = e.target && e.target.tagName;
    if (tag === 'INPUT' || tag === 'SELECT' || tag === 'TEXTAREA') return;
    var steps = {ArrowUp: 1, ArrowRight: 1, ArrowDown: -1, ArrowLeft: -1,
                 PageUp: 10, PageDown: -10};
    if (e.key in steps) go('axial', state.axial + steps[e.key]);
    else if (e.key === 'Home') go('axial', 0);
    else if (e.key === 'End') go('axial', data.counts.axial - 1);
    else return;
    e.preventDefault();
  });
  var boxes = document.querySelectorAll('input.structure');
  for (var k = 0; k < boxes.length; k++) {
    boxes[k].addEventListener('change', function (e) {
      state.hidden[parseInt(e.target.dataset.index, 10)] = !e.target.checked;
      planes.forEach(draw);
    });
  }
  document.getElementById('window').addEventListener('change', function (e) {
    state.window = e.target.value;
    planes.forEach(draw);
  });
  document.body.dataset.ready = '1';
})();
"""

VIEWER_STYLE = """
.viewer { display: grid; grid-template-columns: auto auto; gap: 8px 16px; align-items: start;
  background: #111; color: #ddd; padding: 10px; border-radius: 6px; margin: 8px 0; }
.viewer figure { margin: 0; } .viewer img { display: block; image-rendering: pixelated; }
.viewer img#axial { width: 512px; height: auto; }
.viewer img#coronal, .viewer img#sagittal { width: 360px; height: auto; }
.viewer input[type=range] { width: 100%; } .viewer label { margin-right: 10px; }
.viewer .controls { grid-column: 1 / span 2; } .viewer .pos { font-variant-numeric: tabular-nums; }
"""


def _sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# The job page: its one script by hash, its images from the node, inline style only.
JOB_PAGE_CSP = (f"default-src 'none'; script-src {_sha256_source(VIEWER_SCRIPT)}; "
                "img-src 'self'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'")
