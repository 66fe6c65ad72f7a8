"""The jobs table and a job's page in headless Chromium: every slice of an 80-slice job.

The job is real data on a real server: an 80-slice phantom CT in the spool,
its structure set in the outbox, a delivery that took four attempts and a
geometry finding an operator overrode. Chromium (driven over the DevTools
protocol) loads the page, moves through every axial slice with the keys
and the slider, reads the drawn pixels, toggles a structure and changes the
window.
"""

from __future__ import annotations

import re
import sqlite3

import pytest

from oncoseg_node.commissioning.phantom import write_phantom
from oncoseg_node.config import HttpConfig
from oncoseg_node.intake.spool import Spool
from oncoseg_node.ledger import DeliveryState, Ledger
from oncoseg_node.ledger.migrations import MIGRATIONS
from oncoseg_node.ops.http import HttpServer, StatusSite
from oncoseg_node.ops.metrics import NodeMetrics
from oncoseg_node.ops.qa import Overlay, qa_relpath, write_qa_snapshot
from oncoseg_node.rtstruct.profiles import PROFILES
from oncoseg_node.rtstruct.selfcheck import save_verified
from oncoseg_node.rtstruct.writer import GenerationInfo, RoiMask, build_rtstruct
from tests.browser import Browser
from tests.ctfactory import encode
from tests.test_http import get

SLICES = 80
COLORS = {"External": (0, 255, 0), "Lung_L": (0, 110, 255), "Lung_R": (255, 128, 255)}
FINDING = "slice gap 6.0 mm at z = 30.0 mm (expected 3.0 mm): a slice may be missing"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("jobs-page")
    phantom = write_phantom(tmp / "ct", slices=SLICES, rows=128, columns=128,
                            pixel_spacing=(3.9, 3.9))
    state = tmp / "state"
    ledger = Ledger(state / "ledger.sqlite3")
    spool = Spool(state / "spool")
    for ds in phantom.datasets:
        stored = spool.store(encode(ds))
        ledger.record_instance(sop_instance_uid=str(ds.SOPInstanceUID),
                               series_uid=str(ds.SeriesInstanceUID),
                               study_uid=str(ds.StudyInstanceUID),
                               sop_class_uid=str(ds.SOPClassUID), relpath=stored.relpath,
                               sha256=stored.sha256, size=stored.size, calling_ae="CTSIM")
    series_uid = phantom.volume.series_instance_uid
    job_id = ledger.close_series(series_uid)
    job = ledger.claim(3)
    relpath = f"outbox/job{job_id}-v1-generic.dcm"
    rois = [RoiMask(name, color, "EXTERNAL" if name == "External" else "ORGAN",
                    phantom.truth[name]) for name, color in COLORS.items()]
    ds = build_rtstruct(phantom.volume, rois, GenerationInfo("classical", "-", "thorax", "v"),
                        PROFILES["generic"])
    (state / "outbox").mkdir(parents=True)
    save_verified(ds, state / relpath, phantom.volume, PROFILES["generic"])
    results = [{"name": n, "absent": False, "score": None, "flags": [], "note": "",
                "volume_cc": round(phantom.volume.mask_volume_cc(phantom.truth[n]), 1),
                "color": list(c)} for n, c in COLORS.items()]
    results.append({"name": "Heart", "absent": True, "score": None, "flags": [],
                    "volume_cc": None, "note": "no engine for it", "color": [255, 0, 0]})
    ledger.update_job(job_id, protocol="thorax", protocol_version="62c6488", results=results,
                      rtstruct_uid=str(ds.SOPInstanceUID), rtstruct_relpath=relpath,
                      stage_seconds={"load": 1.25, "segment": 3.5, "write": 0.75},
                      override_finding=FINDING)
    ledger.start_deliveries(job_id, [("tps", str(ds.SOPInstanceUID), relpath)])
    (delivery,) = ledger.deliveries(job_id=job_id)
    for _ in range(3):  # refused three times, stored on the fourth
        ledger.record_attempt(delivery.id, state=DeliveryState.PENDING, status=None,
                              reason="connection refused", next_attempt_at=0.0)
    ledger.record_attempt(delivery.id, state=DeliveryState.DELIVERED, status=0, reason=None)
    write_qa_snapshot(state / qa_relpath(job.id, job.version), phantom.volume,
                      [Overlay(n, phantom.truth[n], c) for n, c in COLORS.items()], panel_px=200)
    site = StatusSite(ledger=ledger, spool=spool, state_dir=state,
                      health=lambda: {"ok": True}, metrics=NodeMetrics().render)
    server = HttpServer(HttpConfig(host="127.0.0.1", port=0), site)
    server.start()
    browser = Browser(tmp / "chromium-profile")
    yield {"port": server.port, "job": job_id, "phantom": phantom, "browser": browser,
           "rtstruct": ds}
    browser.close()
    server.stop()
    ledger.close()


def color_count(browser: Browser, image_id: str, color: tuple[int, int, int]) -> int:
    """Pixels of exactly ``color`` in the image as the browser decoded it."""
    r, g, b = color
    return browser.evaluate(f"""(() => {{
        const img = document.getElementById('{image_id}');
        const c = document.createElement('canvas');
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
        const d = ctx.getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < d.length; i += 4)
            if (d[i] === {r} && d[i + 1] === {g} && d[i + 2] === {b}) n++;
        return n; }})()""")


def loaded(browser: Browser, image_id: str, index: int) -> None:
    """Wait until the image shows slice ``index`` from its latest request."""
    browser.wait_for(f"(() => {{ const i = document.getElementById('{image_id}');"
                     f" return i.dataset.loaded === '{index}' && i.complete &&"
                     f" i.dataset.loadedSrc === i.src; }})()")


@pytest.mark.peers
def test_jobs_table_lists_the_job_with_stage_times_and_attempts(served):
    status, headers, body = get(served["port"], "/jobs")
    page = body.decode()
    assert status == 200 and "<script" not in page.lower()
    assert f'<a href="/jobs/{served["job"]}">Job {served["job"]}</a>' in page
    assert "load 1.2 s, segment 3.5 s, write 0.8 s" in page
    assert "tps: delivered after 4 attempts" in page and "Attempts 1" not in page
    assert "PHANTOM001" in page and "thorax" in page


@pytest.mark.peers
def test_job_page_moves_through_every_slice_and_draws_each_one(served):
    browser, phantom, job = served["browser"], served["phantom"], served["job"]
    browser.load(f"http://127.0.0.1:{served['port']}/jobs/{job}")
    browser.wait_for("document.body.dataset.ready === '1'")
    counts = browser.evaluate("JSON.parse(document.getElementById('viewer-data').textContent)"
                              ".counts")
    assert counts["axial"] == SLICES
    structures = browser.evaluate(
        "JSON.parse(document.getElementById('viewer-data').textContent).structures")
    browser.press("Home", 36)
    lung = phantom.truth["Lung_L"]
    seen_lung = 0
    for k in range(SLICES):
        if k:
            if k % 2:
                browser.press("ArrowUp", 38)
            else:  # every other step through the slider, as a mouse would
                browser.evaluate(f"(() => {{ const s = document.getElementById('axial-slider');"
                                 f" s.value = '{k}'; s.dispatchEvent(new Event('input')); }})()")
        loaded(browser, "axial", k)
        position = browser.evaluate("document.getElementById('axial-pos').textContent")
        z = phantom.volume.positions[k][2]
        assert position == f"slice {k + 1} of {SLICES}, z = {z:.1f} mm", position
        assert color_count(browser, "axial", COLORS["External"]) > 50, k
        drawn = color_count(browser, "axial", COLORS["Lung_L"])
        if lung[k].sum() >= 20:
            assert drawn > 10, f"Lung_L not drawn on slice {k}"
            seen_lung += 1
        elif not lung[k].any():
            assert drawn == 0, f"Lung_L drawn on slice {k} where it has no contour"
    assert seen_lung > 10
    assert structures == list(COLORS)


@pytest.mark.peers
def test_toggle_window_and_other_planes(served):
    browser, job = served["browser"], served["job"]
    browser.load(f"http://127.0.0.1:{served['port']}/jobs/{job}")
    browser.wait_for("document.body.dataset.ready === '1'")
    start = browser.evaluate("JSON.parse(document.getElementById('viewer-data').textContent)"
                             ".start.axial")
    loaded(browser, "axial", start)
    assert color_count(browser, "axial", COLORS["Lung_L"]) > 10
    volume = served["phantom"].volume
    for plane, axis in (("coronal", 1), ("sagittal", 0)):
        index = browser.evaluate(
            f"JSON.parse(document.getElementById('viewer-data').textContent).start.{plane}")
        loaded(browser, plane, index)
        assert color_count(browser, plane, COLORS["External"]) > 50, plane
        # the cut's patient coordinate (HFS: rows run posterior, columns to the left)
        mm = volume.positions[0][axis] + index * volume.pixel_spacing[1 - axis]
        letter = "y" if plane == "coronal" else "x"
        assert browser.evaluate(f"document.getElementById('{plane}-pos').textContent") == \
            f"{index + 1} of 128, {letter} = {mm:.1f} mm"
    # a click on the axial slice moves the other two cuts through that point
    box = browser.evaluate("(() => { const r = document.getElementById('axial')"
                           ".getBoundingClientRect(); return [r.left, r.top, r.width]; })()")
    natural = browser.evaluate("document.getElementById('axial').naturalWidth")
    scale = box[2] / natural
    row, col = 40, 90  # a point in the patient's left lung, in slice pixels
    x, y = box[0] + (22 + col + 0.5) * scale, box[1] + (22 + row + 0.5) * scale
    for kind in ("mousePressed", "mouseReleased"):
        browser.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left",
                     clickCount=1)
    loaded(browser, "coronal", row)
    loaded(browser, "sagittal", col)
    # hide Lung_L: gone from every plane, the others stay
    index = list(COLORS).index("Lung_L")
    browser.evaluate(f"document.querySelector('input.structure[data-index=\"{index}\"]').click()")
    browser.wait_for("document.getElementById('axial').src.includes('show=0,2')")
    loaded(browser, "axial", start)
    assert color_count(browser, "axial", COLORS["Lung_L"]) == 0
    assert color_count(browser, "axial", COLORS["External"]) > 50
    assert color_count(browser, "axial", COLORS["Lung_R"]) > 10
    # the lung window shows lung tissue as grey, the soft-tissue window as black
    gray_soft = browser.evaluate(GRAY_MEAN)
    browser.evaluate("(() => { const w = document.getElementById('window'); w.value = 'lung';"
                     " w.dispatchEvent(new Event('change')); })()")
    browser.wait_for("document.getElementById('axial').src.includes('window=lung')")
    loaded(browser, "axial", start)
    assert browser.evaluate(GRAY_MEAN) > gray_soft + 20
    # download links for the structure set and the QA picture (served: see the HTTP test);
    # nothing was fetched from anywhere but the node
    links = browser.evaluate("[...document.querySelectorAll('a[download]')]"
                             ".map(a => a.getAttribute('href'))")
    assert links == [f"/jobs/{job}/rtstruct.dcm", f"/jobs/{job}/qa.png"]
    origins = browser.evaluate("performance.getEntriesByType('resource')"
                               ".map(e => new URL(e.name).origin)")
    assert set(origins) == {f"http://127.0.0.1:{served['port']}"}
    text = browser.evaluate("document.body.innerText")
    assert f"released by an operator despite: {FINDING}" in text
    assert "Heart" in text and "not found" in text
    assert "delivered after 4 attempts" in text


# Mean grey level of the axial image's centre (lung tissue on this phantom's mid slices).
GRAY_MEAN = """(() => {
    const img = document.getElementById('axial');
    const c = document.createElement('canvas');
    c.width = img.naturalWidth; c.height = img.naturalHeight;
    const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
    const d = ctx.getImageData(0, 0, c.width, c.height).data;
    let sum = 0, n = 0;
    for (let i = 0; i < d.length; i += 4)
        if (d[i] === d[i + 1] && d[i + 1] === d[i + 2] && d[i] > 0) { sum += d[i]; n++; }
    return n ? sum / n : 0; })()"""


@pytest.mark.peers
def test_job_page_and_downloads_over_http(served):
    port, job = served["port"], served["job"]
    status, headers, body = get(port, f"/jobs/{job}")
    assert status == 200
    csp = headers["Content-Security-Policy"]
    assert re.search(r"script-src 'sha256-[A-Za-z0-9+/=]+'", csp) and "unsafe-eval" not in csp
    status, headers, body = get(port, f"/jobs/{job}/rtstruct.dcm")
    assert status == 200 and headers["Content-Type"] == "application/dicom"
    assert f'filename="RS.{served["rtstruct"].SOPInstanceUID}.dcm"' in \
        headers["Content-Disposition"]
    assert body[128:132] == b"DICM"
    assert get(port, f"/jobs/{job}/view/axial/{SLICES}.png")[0] == 400
    assert get(port, f"/jobs/{job}/view/axial/0.png?window=nonsense")[0] == 400
    assert get(port, "/jobs/999/view/axial/0.png")[0] == 404
    assert get(port, "/jobs/999")[0] == 404
    status, headers, body = get(port, f"/jobs/{job}/view/sagittal/64.png?show=none")
    assert status == 200 and headers["Content-Type"] == "image/png"


def test_schema_2_ledger_gains_stage_times_and_the_override_finding(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    db = sqlite3.connect(path)
    for migration in MIGRATIONS[:2]:
        for statement in migration.statements:
            db.execute(statement)
    db.execute("PRAGMA user_version = 2")
    db.execute("INSERT INTO jobs (series_uid, version, state, created_at, updated_at) "
               "VALUES ('1.2.3', 1, 'sent', 1.0, 2.0)")
    db.commit()
    db.close()
    ledger = Ledger(path)
    (job,) = ledger.jobs()
    assert job.series_uid == "1.2.3" and job.stage_seconds is None and job.override_finding is None
    ledger.update_job(job.id, stage_seconds={"load": 1.0}, override_finding="gap")
    again = ledger.job(job.id)
    assert again is not None and again.stage_seconds == {"load": 1.0}
    assert again.override_finding == "gap"
    ledger.close()


def test_structure_names_from_dicom_cannot_end_the_viewer_data(tmp_path):
    from oncoseg_node.ops.jobs_page import JobView, render_job_page
    from oncoseg_node.ops.viewer import JobViewer
    from tests.test_http import HOSTILE, tiny_volume

    volume, overlays = tiny_volume()
    name = f"</script><!--<script>{HOSTILE}"
    viewer = JobViewer(volume, [(name, (0, 255, 0), overlays[0].mask)])
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    ledger.record_instance(sop_instance_uid="1.2.3.1", series_uid="1.2.3", study_uid="1.2",
                           sop_class_uid="1.2.840.10008.5.1.4.1.1.2", relpath="objects/x.dcm",
                           sha256="0" * 64, size=1, calling_ae="CTSIM")
    job = ledger.job(ledger.close_series("1.2.3"))
    page = render_job_page(JobView(job=job), viewer)
    ledger.close()
    # exactly our two script elements: the data block and the viewer
    assert page.lower().count("<script") == 2 and page.lower().count("</script") == 2
    assert "\\u003c/script>\\u003c!--" in page
