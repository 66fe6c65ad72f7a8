"""The node's small HTTP server: health for IT, metrics for Prometheus, job pages for physics.

Routes:

- ``/healthz``: open to all, and tells nothing about patients: 200 when
  every check passes (listener, ledger, worker, assembler and its recent
  polls, deliveries, protocol watcher and the protocols file, free disk),
  503 otherwise; a JSON body names each check and says why a failing one fails.
- ``/metrics``: Prometheus text format (see :mod:`oncoseg_node.ops.metrics`),
  to the bearer of ``http.metrics_token_file``'s token, or without one
  configured to loopback clients only.
- ``/jobs``: recent jobs as one table (see :mod:`oncoseg_node.ops.jobs_page`).
- ``/jobs/<id>``: one job: slice viewer, structures, gate findings, downloads.
- ``/jobs/<id>/view/<plane>/<index>.png?window=W&show=i,j``: one viewer slice.
- ``/jobs/<id>/qa.png``: the QA snapshot; ``/jobs/<id>/rtstruct.dcm``: the
  structure set as sent (a download: physicists only).
- ``/signin`` (GET the form, POST it) and ``/signout`` (POST) when
  ``http.auth`` is configured (see :mod:`oncoseg_node.ops.web_auth`).

Every job route needs a signed-in user when ``http.auth`` is configured
(without it, which config allows on loopback only, everyone is served as
before), and every view of one is an audit line (:mod:`oncoseg_node.ops.audit`).
Every POST carries a CSRF token. HTTPS when ``http.tls`` is set
(:mod:`oncoseg_node.ops.web_tls`).

Standard library ``http.server``: a handful of requests per minute need no
framework. Requests run on a small fixed pool of threads with a deadline per
connection (:mod:`oncoseg_node.ops.http_pool`), so slow or idle clients
cannot pile up threads. Everything that came from DICOM or the ledger is
HTML-escaped; each page carries a Content Security Policy, so an escaping
slip cannot run code, and every answer forbids framing and referrers.
"""

from __future__ import annotations

import hmac
import json
import re
import socket
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

import structlog

from oncoseg_node.config import HttpConfig, http_warnings, private_file_problem
from oncoseg_node.ops import audit
from oncoseg_node.ops.http_pool import PooledHTTPServer
from oncoseg_node.ops.http_site import DEFAULT_JOBS, MAX_JOBS, StatusSite
from oncoseg_node.ops.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from oncoseg_node.ops.signin_page import (
    SIGNIN_CSP,
    render_signin,
    safe_next,
    signout_bar,
    with_bar,
)
from oncoseg_node.ops.viewer_script import JOB_PAGE_CSP
from oncoseg_node.ops.web_auth import COOKIE, Authenticator, Identity, Refusal, is_loopback
from oncoseg_node.ops.web_tls import ServerTls

__all__ = ["HttpServer", "StatusSite"]

log = structlog.get_logger("oncoseg_node.ops.http")

QA_ROUTE = re.compile(r"^/jobs/(\d{1,18})/qa\.png$")
JOB_ROUTE = re.compile(r"^/jobs/(\d{1,18})/?$")
RTSTRUCT_ROUTE = re.compile(r"^/jobs/(\d{1,18})/rtstruct\.dcm$")
VIEW_ROUTE = re.compile(r"^/jobs/(\d{1,18})/view/(axial|coronal|sagittal)/(\d{1,5})\.png$")
PAGE_CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'"
MAX_FORM_BYTES = 16 * 1024
HTML = "text/html; charset=utf-8"


@dataclass(frozen=True)
class Route:
    """A route to patient data: what it fetches (for the audit line) and what it needs."""

    fetched: str
    job_id: int | None
    action: str  # view or download
    match: re.Match[str] | None = None


def route_of(path: str) -> Route | None:
    if path in ("/jobs", "/jobs/"):
        return Route("jobs_list", None, "view")
    if match := JOB_ROUTE.match(path):
        return Route("job_page", int(match.group(1)), "view", match)
    if match := QA_ROUTE.match(path):
        return Route("qa.png", int(match.group(1)), "view", match)
    if match := RTSTRUCT_ROUTE.match(path):
        return Route("rtstruct.dcm", int(match.group(1)), "download", match)
    if match := VIEW_ROUTE.match(path):
        return Route(f"slice {match.group(2)} {match.group(3)}", int(match.group(1)), "view",
                     match)
    return None


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    @property
    def address(self) -> str:
        return str(self.client_address[0])

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        url = urlsplit(self.path)
        try:
            self._get(url.path, url.query)
        except Exception:  # one bad request must not take the server thread down
            log.exception("http_request_failed", path=url.path)
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, "text/plain", b"internal error\n")

    def do_POST(self) -> None:  # noqa: N802 - the name http.server dispatches to
        url = urlsplit(self.path)
        try:
            self._post(url.path)
        except Exception:  # one bad request must not take the server thread down
            log.exception("http_request_failed", path=url.path)
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, "text/plain", b"internal error\n")

    # -- GET ------------------------------------------------------------------

    def _get(self, path: str, query: str) -> None:
        site, auth = self.server.site, self.server.auth
        if path == "/healthz":
            code, body = site.healthz()
            self._send(code, "application/json", json.dumps(body).encode())
        elif path == "/metrics":
            if self._metrics_allowed():
                self._send(HTTPStatus.OK, METRICS_CONTENT_TYPE, site.metrics().encode())
        elif path == "/signin" and auth.enabled:
            self._signin_form(HTTPStatus.OK, parse_qs(query).get("next", ["/jobs"])[0])
        elif path == "/":
            self._send(HTTPStatus.FOUND, "text/plain", b"see /jobs\n", {"Location": "/jobs"})
        elif (route := route_of(path)) is None:
            self._send(HTTPStatus.NOT_FOUND, "text/plain", b"not found\n")
        elif (who := self._identity()) is not None:
            status = int(HTTPStatus.INTERNAL_SERVER_ERROR)  # unless the route answers
            try:
                if who.may(route.action):
                    status = self._serve_route(route, query, who)
                else:
                    status = self._send(HTTPStatus.FORBIDDEN, "text/plain",
                                        f"a {who.role} may not {route.action} this\n".encode())
            finally:
                audit.viewed(user=who.user, role=who.role, address=self.address,
                             fetched=route.fetched, job_id=route.job_id, status=status,
                             via=who.via)

    def _metrics_allowed(self) -> bool:
        token = self.server.metrics_token
        if token is not None:
            given = self.headers.get("Authorization") or ""
            if given[:7].lower() == "bearer " and hmac.compare_digest(
                    given[7:].strip().encode(), token.encode()):
                return True
            audit.refused(reason="metrics_without_token", address=self.address)
            self._send(HTTPStatus.UNAUTHORIZED, "text/plain", b"bearer token required\n",
                       {"WWW-Authenticate": 'Bearer realm="metrics"'})
            return False
        if is_loopback(self.address):
            return True
        self._send(HTTPStatus.FORBIDDEN, "text/plain", b"metrics are served on loopback only\n")
        return False

    def _identity(self) -> Identity | None:
        """The requester, or None with the refusal, 401 or sign-in page already sent."""
        found = self.server.auth.identify(self.headers, self.address)
        if isinstance(found, Identity):
            return found
        if isinstance(found, Refusal):
            self._refuse(found)
        elif "text/html" in (self.headers.get("Accept") or ""):
            # A browser: the sign-in form itself, as 401 (no Basic challenge, no dialog).
            self._signin_form(HTTPStatus.UNAUTHORIZED, self.path)
        else:
            self._send(HTTPStatus.UNAUTHORIZED, "text/plain", b"sign in first\n",
                       {"WWW-Authenticate": 'Basic realm="oncoseg-node", charset="UTF-8"'})
        return None

    def _refuse(self, refusal: Refusal) -> None:
        headers = {}
        if refusal.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, round(refusal.retry_after_s + 0.5)))
        self._send(refusal.status, "text/plain", f"{refusal.reason}\n".encode(), headers)

    def _serve_route(self, route: Route, query: str, who: Identity) -> int:
        site = self.server.site
        job_id = route.job_id
        if route.fetched == "jobs_list":
            return self._page(site.jobs_page(_limit(query)), PAGE_CSP, who)
        if job_id is None:
            raise AssertionError(route)
        if route.fetched == "job_page":
            page = site.job_page(job_id)
            if page is None:
                return self._send(HTTPStatus.NOT_FOUND, "text/plain", b"no such job\n")
            return self._page(page, JOB_PAGE_CSP, who)
        if route.fetched == "qa.png":
            png = site.qa_png(job_id)
            if png is None:
                return self._send(HTTPStatus.NOT_FOUND, "text/plain",
                                  b"no snapshot for this job\n")
            return self._send(HTTPStatus.OK, "image/png", png)
        if route.fetched == "rtstruct.dcm":
            found = site.rtstruct(job_id)
            if found is None:
                return self._send(HTTPStatus.NOT_FOUND, "text/plain", b"no structure set\n")
            return self._send(HTTPStatus.OK, "application/dicom", found[0],
                              {"Content-Disposition": f'attachment; filename="{found[1]}"'})
        assert route.match is not None
        plane, index = route.match.group(2), int(route.match.group(3))
        try:
            png = site.view_png(job_id, plane, index, query)
        except ValueError as exc:
            return self._send(HTTPStatus.BAD_REQUEST, "text/plain", f"{exc}\n".encode())
        if png is None:
            return self._send(HTTPStatus.NOT_FOUND, "text/plain", b"no slices for this job\n")
        return self._send(HTTPStatus.OK, "image/png", png)

    def _page(self, page: str, csp: str, who: Identity) -> int:
        if who.session is not None:
            page = with_bar(page, signout_bar(user=who.user or "", role=who.role,
                                              csrf=who.session.csrf))
            # the sign-out button posts to the node itself, and nowhere else
            csp = csp.replace("form-action 'none'", "form-action 'self'")
        return self._send(HTTPStatus.OK, HTML, page.encode(), {"Content-Security-Policy": csp})

    def _signin_form(self, code: int, next_path: str, message: str = "") -> None:
        page = render_signin(title=self.server.site.title,
                             csrf=self.server.auth.sessions.signin_token(),
                             next_path=next_path, message=message)
        self._send(code, HTML, page.encode(), {"Content-Security-Policy": SIGNIN_CSP})

    # -- POST: sign-in and sign-out, each with its CSRF token -----------------------

    def _post(self, path: str) -> None:
        auth = self.server.auth
        form = self._form()
        if form is None:
            return
        if not auth.enabled or path not in ("/signin", "/signout"):
            self._send(HTTPStatus.NOT_FOUND, "text/plain", b"not found\n")
        elif path == "/signin":
            self._sign_in(form)
        else:
            self._sign_out(form)

    def _form(self) -> dict[str, str] | None:
        try:
            length = int(self.headers.get("Content-Length") or "0")
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_FORM_BYTES:
            self.close_connection = True
            self._send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "text/plain", b"form too large\n")
            return None
        body = self.rfile.read(length).decode("utf-8", errors="replace")
        return {key: values[0] for key, values in parse_qs(body).items()}

    def _csrf_refused(self, user: str | None) -> None:
        audit.refused(reason="csrf_token_missing_or_wrong", address=self.address, user=user,
                      path=urlsplit(self.path).path)
        self._send(HTTPStatus.FORBIDDEN, "text/plain", b"missing or wrong CSRF token\n")

    def _sign_in(self, form: dict[str, str]) -> None:
        auth = self.server.auth
        if not auth.sessions.signin_token_ok(form.get("csrf", "")):
            self._csrf_refused(form.get("user"))
            return
        next_path = safe_next(form.get("next"))
        result = auth.sign_in(form.get("user", ""), form.get("password", ""), self.address)
        if isinstance(result, Refusal):
            if result.retry_after_s is not None:
                self._refuse(result)
            else:
                self._signin_form(result.status, next_path, "Wrong name or password.")
            return
        token, _ = result
        self._send(HTTPStatus.SEE_OTHER, "text/plain", b"signed in\n", {
            "Location": next_path,
            "Set-Cookie": f"{COOKIE}={token}; Path=/; HttpOnly; Secure; SameSite=Strict"})

    def _sign_out(self, form: dict[str, str]) -> None:
        auth = self.server.auth
        who = auth.identify(self.headers, self.address)
        session = who.session if isinstance(who, Identity) else None
        given = form.get("csrf") or self.headers.get("X-CSRF-Token") or ""
        if session is None or who is None or isinstance(who, Refusal) or \
                not hmac.compare_digest(given.encode(), session.csrf.encode()):
            self._csrf_refused(session.user if session else None)
            return
        assert who.token is not None
        auth.sign_out(who.token, self.address)
        self._send(HTTPStatus.SEE_OTHER, "text/plain", b"signed out\n", {
            "Location": "/signin",
            "Set-Cookie": f"{COOKIE}=; Path=/; Max-Age=0; HttpOnly; Secure; SameSite=Strict"})

    # -- the answer -------------------------------------------------------------

    def _send(self, code: int, content_type: str, body: bytes,
              headers: dict[str, str] | None = None) -> int:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Referrer-Policy", "no-referrer")
        if self.server.tls is not None:
            self.send_header("Strict-Transport-Security", "max-age=31536000")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)
        return int(code)

    def handle_one_request(self) -> None:
        super().handle_one_request()
        # A keep-alive connection gets a fresh deadline for its next request.
        self.server.extend_deadline(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        log.debug("http_request", client=self.address, request=format % args)


def _limit(query: str) -> int:
    values = parse_qs(query).get("limit") or []
    try:
        return max(1, min(int(values[0]), MAX_JOBS)) if values else DEFAULT_JOBS
    except ValueError:
        return DEFAULT_JOBS


class _Server(PooledHTTPServer):
    site: StatusSite
    auth: Authenticator
    metrics_token: str | None


def read_token(config: HttpConfig) -> str | None:
    """The metrics bearer token; PermissionError for a file others can read."""
    path = config.metrics_token_file
    if path is None:
        return None
    if (problem := private_file_problem(path)) is not None:
        raise PermissionError(problem)
    return path.read_text().strip() or None


class HttpServer:
    """Owns the listening socket and its thread; ``port`` is the bound port (for port 0)."""

    def __init__(self, config: HttpConfig, site: StatusSite) -> None:
        self.config = config
        self.site = site
        self.auth = Authenticator(config.auth, tls=config.tls.enabled)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.server_address[1])

    @property
    def scheme(self) -> str:
        return "https" if self.config.tls.enabled else "http"

    def start(self) -> None:
        for warning in http_warnings(self.config):
            log.warning("http_config_warning", detail=warning)
        tls = ServerTls(self.config.tls) if self.config.tls.enabled else None
        server_class = type("_BoundServer", (_Server,), {
            "address_family": socket.AF_INET6 if ":" in self.config.host else socket.AF_INET})
        server = server_class((self.config.host, self.config.port), _Handler,
                              threads=self.config.threads, timeout_s=self.config.timeout_s)
        server.site = self.site
        server.auth = self.auth
        server.tls = tls
        server.metrics_token = read_token(self.config)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="http", daemon=True,
                                        kwargs={"poll_interval": 0.2})
        self._thread.start()
        log.info("http_listening", host=self.config.host, port=self.port, scheme=self.scheme,
                 accounts=self.auth.enabled)

    def reload(self) -> None:
        """Re-read the certificate and the metrics token (on SIGHUP); accounts follow their file."""
        server = self._server
        if server is None:
            return
        if server.tls is not None:
            server.tls.reload()
        try:
            server.metrics_token = read_token(self.config)
        except OSError as exc:
            log.error("metrics_token_reload_failed", error=f"{type(exc).__name__}: {exc}")

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
