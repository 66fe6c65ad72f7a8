"""Pages only for those allowed: HTTPS, sign-in, roles, SSO by proxy, CSRF, throttling, audit.

One real HttpServer over HTTPS with a test CA, accounts made by the
``oncoseg-node users`` command, and real clients: curl and headless Chromium.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import structlog

from oncoseg_node.commissioning.phantom import write_phantom
from oncoseg_node.config import LoggingConfig, load_config
from oncoseg_node.intake.spool import Spool
from oncoseg_node.ledger import Ledger
from oncoseg_node.ops.http import HttpServer, StatusSite
from oncoseg_node.ops.logs import configure_logging
from oncoseg_node.ops.metrics import NodeMetrics
from oncoseg_node.ops.web_sessions import FailureThrottle
from oncoseg_node.rtstruct.profiles import PROFILES
from oncoseg_node.rtstruct.selfcheck import save_verified
from oncoseg_node.rtstruct.writer import GenerationInfo, RoiMask, build_rtstruct
from tests.browser import Browser
from tests.conftest import write_config
from tests.ctfactory import encode
from tests.web_clients import Curl, chromium_trusting, make_pki

pytestmark = pytest.mark.peers

PASSWORDS = {"vera": "viewer-pass-1234", "phil": "physicist-pass-5678"}
TOKEN = "metrics-token-abcdef0123456789"
PATIENT = "Secret^Patient"


def users_cli(config: Path, *args: str, password: str | None = None
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "oncoseg_node.cli", "users", *args,
                           "--config", str(config)], input=password, capture_output=True,
                          text=True, timeout=60)


def one_job(state: Path) -> tuple[Ledger, Spool, int]:
    """A small contoured job: CT in the spool, its structure set in the outbox."""
    phantom = write_phantom(state.parent / "ct", slices=12, rows=64, columns=64,
                            pixel_spacing=(7.8, 7.8))
    ledger, spool = Ledger(state / "ledger.sqlite3"), Spool(state / "spool")
    for ds in phantom.datasets:
        ds.PatientName = PATIENT
        stored = spool.store(encode(ds))
        ledger.record_instance(sop_instance_uid=str(ds.SOPInstanceUID),
                               series_uid=str(ds.SeriesInstanceUID),
                               study_uid=str(ds.StudyInstanceUID),
                               sop_class_uid=str(ds.SOPClassUID), relpath=stored.relpath,
                               sha256=stored.sha256, size=stored.size, calling_ae="CTSIM")
    job_id = ledger.close_series(phantom.volume.series_instance_uid)
    ledger.claim(3)
    relpath = f"outbox/job{job_id}-v1-generic.dcm"
    ds = build_rtstruct(phantom.volume, [RoiMask("External", (0, 255, 0), "EXTERNAL",
                                                 phantom.truth["External"])],
                        GenerationInfo("classical", "-", "thorax", "v"), PROFILES["generic"])
    (state / "outbox").mkdir(parents=True)
    save_verified(ds, state / relpath, phantom.volume, PROFILES["generic"])
    ledger.update_job(job_id, protocol="thorax", protocol_version="1", results=[
        {"name": "External", "absent": False, "score": None, "flags": [], "note": "",
         "volume_cc": 1.0, "color": [0, 255, 0]}],
        rtstruct_uid=str(ds.SOPInstanceUID), rtstruct_relpath=relpath)
    return ledger, spool, job_id


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secure")
    pki = make_pki(tmp / "pki")
    token = tmp / "metrics.token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    config = write_config(tmp, http={
        "tls": {"cert_file": str(pki.cert), "key_file": str(pki.key)},
        "auth": {"users_file": str(tmp / "users.json"), "trusted_proxy": ["127.0.0.2"],
                 "group_roles": {"rt-physics": "physicist", "rt-staff": "viewer"}},
        "metrics_token_file": str(token)})
    for name, role in (("vera", "viewer"), ("phil", "physicist")):
        proc = users_cli(config, "add", name, "--role", role, password=PASSWORDS[name] + "\n")
        assert proc.returncode == 0, proc.stderr
    ledger, spool, job_id = one_job(tmp / "state")
    stream = io.StringIO()
    saved = structlog.get_config()
    configure_logging(LoggingConfig(format="json", level="debug"), stream)
    site = StatusSite(ledger=ledger, spool=spool, state_dir=tmp / "state",
                      health=lambda: {"ok": True}, metrics=NodeMetrics().render)
    server = HttpServer(load_config(config).http, site)
    server.start()
    yield {"server": server, "port": server.port, "job": job_id, "pki": pki, "tmp": tmp,
           "config": config, "log": stream, "base": f"https://127.0.0.1:{server.port}"}
    server.stop()
    ledger.close()
    structlog.configure(**saved)


@pytest.fixture
def curl(secure, tmp_path):
    return Curl(secure["base"], secure["pki"].ca, tmp_path / "cookies.txt")


@pytest.fixture(autouse=True)
def fresh_throttle(secure):
    secure["server"].auth.throttle = FailureThrottle()


def audit_lines(secure) -> list[dict]:
    lines = [json.loads(line) for line in secure["log"].getvalue().splitlines()]
    return [line for line in lines if line.get("audit")]


def test_users_file_is_0600_and_lists_names_and_roles(secure):
    users = secure["tmp"] / "users.json"
    assert users.stat().st_mode & 0o777 == 0o600
    assert PASSWORDS["vera"] not in users.read_text()
    listed = users_cli(secure["config"], "list")
    assert listed.stdout.split("\n")[:2] == ["phil\tphysicist", "vera\tviewer"]


def test_without_signing_in_pages_and_downloads_are_401_and_healthz_tells_no_patient(
        secure, curl):
    job = secure["job"]
    for path in ("/jobs", f"/jobs/{job}", f"/jobs/{job}/view/axial/3.png",
                 f"/jobs/{job}/qa.png", f"/jobs/{job}/rtstruct.dcm"):
        answer = curl(path)
        assert answer.status == 401, path
        assert "basic" in answer.headers["www-authenticate"].lower()
        assert PATIENT.split("^")[0] not in answer.text
    browser_like = curl(f"/jobs/{job}", "-H", "Accept: text/html")
    assert browser_like.status == 401 and 'action="/signin"' in browser_like.text
    health = curl("/healthz")
    assert health.status == 200 and json.loads(health.body)["status"] == "ok"
    assert "Secret" not in health.text
    assert health.headers["strict-transport-security"].startswith("max-age=")


def test_viewer_sees_pages_but_not_downloads_and_each_view_is_audited(secure, curl):
    job = secure["job"]
    signed = curl.sign_in("vera", PASSWORDS["vera"], f"/jobs/{job}")
    assert signed.status == 303 and signed.headers["location"] == f"/jobs/{job}"
    cookie = signed.headers["set-cookie"]
    for flag in ("HttpOnly", "Secure", "SameSite=Strict"):
        assert flag in cookie
    page = curl(f"/jobs/{job}")
    assert page.status == 200 and "Secret" in page.text and "vera (viewer)" in page.text
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert "content-security-policy" in page.headers
    assert curl(f"/jobs/{job}/view/axial/3.png").status == 200
    assert curl(f"/jobs/{job}/rtstruct.dcm").status == 403
    views = [(a["fetched"], a["status"]) for a in audit_lines(secure)
             if a["event"] == "http_view" and a["user"] == "vera"]
    assert ("job_page", 200) in views and ("slice axial 3", 200) in views
    assert ("rtstruct.dcm", 403) in views
    line = next(a for a in audit_lines(secure) if a.get("fetched") == "job_page")
    assert line["role"] == "viewer" and line["address"] == "127.0.0.1" and line["job_id"] == job


def test_physicist_downloads_the_structure_set(secure, curl):
    assert curl.sign_in("phil", PASSWORDS["phil"]).status == 303
    answer = curl(f"/jobs/{secure['job']}/rtstruct.dcm")
    assert answer.status == 200 and answer.body[128:132] == b"DICM"
    assert any(a.get("fetched") == "rtstruct.dcm" and a["user"] == "phil" and
               a["status"] == 200 for a in audit_lines(secure))


def test_basic_credentials_serve_scripts(secure, curl):
    answer = curl(f"/jobs/{secure['job']}/rtstruct.dcm", "-u", f"phil:{PASSWORDS['phil']}")
    assert answer.status == 200
    assert curl("/jobs", "-u", "phil:wrong-password-x").status == 401


def test_five_wrong_passwords_slow_the_next_try(secure, curl):
    for _ in range(5):
        assert curl.sign_in("phil", "not-the-password").status == 401
    slowed = curl.sign_in("phil", PASSWORDS["phil"])
    assert slowed.status == 429 and int(slowed.headers["retry-after"]) >= 1
    time.sleep(int(slowed.headers["retry-after"]) + 0.2)
    assert curl.sign_in("phil", PASSWORDS["phil"]).status == 303
    reasons = [a["reason"] for a in audit_lines(secure) if a["event"] == "http_refused"]
    assert "wrong_name_or_password" in reasons and "throttled" in reasons


def test_proxy_header_only_from_the_trusted_proxy(secure, curl):
    job = secure["job"]
    forged = curl(f"/jobs/{job}", "-H", "X-Remote-User: mallory",
                  "-H", "X-Remote-Groups: rt-physics")
    assert forged.status == 403 and "Secret" not in forged.text
    proxied = curl(f"/jobs/{job}/rtstruct.dcm", "--interface", "127.0.0.2",
                   "-H", "X-Remote-User: pat", "-H", "X-Remote-Groups: staff,rt-physics")
    assert proxied.status == 200
    viewer = curl(f"/jobs/{job}/rtstruct.dcm", "--interface", "127.0.0.2",
                  "-H", "X-Remote-User: sam", "-H", "X-Remote-Groups: rt-staff")
    assert viewer.status == 403
    nobody = curl(f"/jobs/{job}", "--interface", "127.0.0.2", "-H", "X-Remote-User: eve")
    assert nobody.status == 403
    assert any(a.get("reason") == "proxy_header_from_untrusted_address"
               for a in audit_lines(secure))
    assert any(a.get("user") == "pat" and a.get("via") == "proxy" for a in audit_lines(secure))


def test_cookie_replayed_after_sign_out_or_idle_timeout_is_refused(secure, curl, tmp_path):
    curl.sign_in("vera", PASSWORDS["vera"])
    page = curl("/jobs")
    cookie = next(line.split("\t")[-1] for line in (tmp_path / "cookies.txt").read_text()
                  .splitlines() if "oncoseg_session" in line)
    csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
    out = curl("/signout", "--data-urlencode", f"csrf={csrf}")
    assert out.status == 303
    replay = curl("/jobs", "-H", f"Cookie: oncoseg_session={cookie}")
    assert replay.status == 401
    sessions = secure["server"].auth.sessions
    curl.sign_in("vera", PASSWORDS["vera"])
    assert curl("/jobs").status == 200
    sessions.idle_s = 0.5
    try:
        time.sleep(0.8)
        assert curl("/jobs").status == 401
    finally:
        sessions.idle_s = 900.0


def test_state_changing_request_without_csrf_token_is_refused(secure, curl):
    curl.sign_in("vera", PASSWORDS["vera"])
    assert curl("/signout", "-X", "POST").status == 403
    assert curl("/signout", "--data-urlencode", "csrf=forged").status == 403
    assert curl("/jobs").status == 200  # still signed in: nothing changed
    no_form_token = curl("/signin", "--data-urlencode", "user=vera",
                         "--data-urlencode", f"password={PASSWORDS['vera']}")
    assert no_form_token.status == 403


def test_metrics_need_the_bearer_token(secure, curl):
    assert curl("/metrics").status == 401
    assert curl("/metrics", "-H", "Authorization: Bearer wrong").status == 401
    answer = curl("/metrics", "-H", f"Authorization: Bearer {TOKEN}")
    assert answer.status == 200 and "Secret" not in answer.text


def test_no_password_token_or_cookie_in_any_log_line(secure, curl):
    curl.sign_in("phil", PASSWORDS["phil"])
    curl("/jobs")
    curl("/metrics", "-H", f"Authorization: Bearer {TOKEN}")
    curl("/jobs", "-u", f"vera:{PASSWORDS['vera']}")
    curl.sign_in("vera", "a-wrong-password-typed")
    text = secure["log"].getvalue()
    cookie = [line.split("\t")[-1] for line in curl.jar.read_text().splitlines()
              if "oncoseg_session" in line]
    assert cookie
    for secret in (*PASSWORDS.values(), TOKEN, "a-wrong-password-typed", *cookie,
                   base64.b64encode(f"vera:{PASSWORDS['vera']}".encode()).decode()):
        assert secret not in text


def test_tls_below_1_2_is_refused(secure):
    proc = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{secure['port']}",
                           "-tls1_1", "-CAfile", str(secure["pki"].ca)],
                          input=b"", capture_output=True, timeout=30)
    assert proc.returncode != 0 or b"Cipher is (NONE)" in proc.stdout


def test_chromium_signs_in_over_https_and_sees_the_job(secure, tmp_path, monkeypatch):
    bin_dir = chromium_trusting(tmp_path / "bin", secure["pki"])
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    browser = Browser(tmp_path / "profile")
    try:
        job = secure["job"]
        browser.load(f"{secure['base']}/jobs/{job}")
        assert browser.evaluate("document.querySelector('form[action=\"/signin\"]') !== null")
        assert "Secret" not in browser.evaluate("document.body.innerText")
        browser.evaluate(f"""(() => {{
            document.querySelector('input[name=user]').value = 'vera';
            document.querySelector('input[name=password]').value = '{PASSWORDS["vera"]}';
            document.querySelector('form').submit(); }})()""")
        browser.wait_for(f"location.pathname === '/jobs/{job}' && "
                         "document.readyState === 'complete' && "
                         "document.body.innerText.includes('vera (viewer)')")
        assert "Secret" in browser.evaluate("document.body.innerText")
        assert browser.evaluate("document.cookie") == ""  # HttpOnly: no script reads it
        browser.evaluate("document.getElementById('signout').submit()")
        browser.wait_for("location.pathname === '/signin' && document.readyState === 'complete'")
        browser.load(f"{secure['base']}/jobs/{job}")
        assert "Secret" not in browser.evaluate("document.body.innerText")
    finally:
        browser.close()
    assert any(a.get("user") == "vera" and a.get("via") == "session" and
               a.get("fetched") == "job_page" for a in audit_lines(secure))
