"""Who is asking: a session cookie, HTTP Basic, or the site's reverse proxy; and what they may do.

With no ``http.auth`` configured the node serves as it always has: every
page to every client, which config allows on loopback only. Otherwise each
request is one of:

- a header naming the user (``user_header``) from a ``trusted_proxy``
  address: the site's single sign-on already checked them; the groups the
  proxy sends are mapped to a role. The same header from any other address
  is refused outright: it is a forgery.
- ``Authorization: Basic`` (scripts), over HTTPS or from loopback only;
  a verified password is remembered for a minute, keyed by a keyed hash of
  the name, password and stored hash, so a script's requests do not each
  pay for argon2.
- the session cookie set by the sign-in form.

Roles: ``viewer`` sees the job list, pages, slices and QA pictures;
``physicist`` also downloads structure sets.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import re
import secrets
import threading
import time
from dataclasses import dataclass
from email.message import Message
from http import HTTPStatus

from oncoseg_node.config import HttpAuthConfig
from oncoseg_node.ops import audit
from oncoseg_node.ops.users import UserStore
from oncoseg_node.ops.web_sessions import FailureThrottle, Session, SessionStore

COOKIE = "oncoseg_session"
BASIC_CACHE_S = 60.0
PROXY_USER_RE = re.compile(r"^[\x21-\x7e]{1,256}$")
CAN = {"viewer": frozenset({"view"}), "physicist": frozenset({"view", "download"})}


@dataclass(frozen=True)
class Identity:
    """A request's user (None without accounts), role and how they were known."""

    user: str | None
    role: str
    via: str  # none, session, basic, proxy
    session: Session | None = None
    token: str | None = None

    def may(self, action: str) -> bool:
        return action in CAN.get(self.role, frozenset())


@dataclass(frozen=True)
class Refusal:
    status: HTTPStatus
    reason: str
    retry_after_s: float | None = None


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def cookie_value(header: str | None, name: str = COOKIE) -> str | None:
    for part in (header or "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name and value:
            return value
    return None


class Authenticator:
    def __init__(self, config: HttpAuthConfig, *, tls: bool,
                 throttle: FailureThrottle | None = None) -> None:
        self.config = config
        self.enabled = config.enabled
        self.tls = tls
        self.users = UserStore(config.users_file) if config.users_file else None
        self.sessions = SessionStore(config.session_idle_s)
        self.throttle = throttle or FailureThrottle()
        self._proxies = [ipaddress.ip_network(p, strict=False) for p in config.trusted_proxy]
        self._cache_key = secrets.token_bytes(32)
        self._basic_ok: dict[bytes, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def identify(self, headers: Message, address: str
                 ) -> Identity | Refusal | None:
        """The requester, a refusal, or None: nobody signed in (sign-in page or 401)."""
        if not self.enabled:
            return Identity(None, "physicist", "none")
        proxied = self._from_proxy(headers, address)
        if proxied is not None:
            return proxied
        authorization = headers.get("Authorization") or ""
        if authorization[:6].lower() == "basic ":
            return self._basic(authorization[6:].strip(), address)
        token = cookie_value(headers.get("Cookie"))
        if token is None:
            return None
        session = self.sessions.get(token)
        if session is None:
            return None
        role = self.users.role_of(session.user) if self.users else None
        if role is None:
            self.sessions.end(token)  # the account was removed
            return None
        return Identity(session.user, role, "session", session, token)  # role as the file says

    def _from_proxy(self, headers: Message, address: str
                    ) -> Identity | Refusal | None:
        name = self.config.user_header
        values = headers.get_all(name) or []
        user = headers.get(name)
        if user is None:
            return None
        if not self._trusted(address):
            audit.refused(reason="proxy_header_from_untrusted_address", address=address,
                          header=name)
            return Refusal(HTTPStatus.FORBIDDEN, "user header from an untrusted address")
        if len(values) != 1 or not PROXY_USER_RE.match(user):
            audit.refused(reason="proxy_header_malformed", address=address, header=name)
            return Refusal(HTTPStatus.BAD_REQUEST, "malformed user header")
        groups = [g.strip() for g in (headers.get(self.config.groups_header) or "").split(",")]
        roles = {self.config.group_roles[g] for g in groups if g in self.config.group_roles}
        role = ("physicist" if "physicist" in roles else "viewer" if roles
                else self.config.proxy_default_role)
        if role is None:
            audit.refused(reason="proxy_user_has_no_role", address=address, user=user)
            return Refusal(HTTPStatus.FORBIDDEN, "no role for this user")
        return Identity(user, role, "proxy")

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._proxies)

    def _basic(self, encoded: str, address: str) -> Identity | Refusal:
        if not self.tls and not is_loopback(address):
            audit.refused(reason="basic_over_plain_http", address=address)
            return Refusal(HTTPStatus.FORBIDDEN, "HTTP Basic only over HTTPS")
        try:
            name, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            sep, name, password = "", "", ""
        if not sep:
            return Refusal(HTTPStatus.BAD_REQUEST, "malformed Basic credentials")
        role = self._cached(name, password)
        if role is not None:
            return Identity(name, role, "basic")
        checked = self.check_password(name, password, address, via="basic")
        if isinstance(checked, Refusal):
            return checked
        with self._lock:
            self._basic_ok[self._basic_key(name, password)] = (
                checked, time.monotonic() + BASIC_CACHE_S)
        return Identity(name, checked, "basic")

    def _basic_key(self, name: str, password: str) -> bytes:
        stored = self.users.stored_hash(name) if self.users else None
        message = "\0".join((name, password, stored or "")).encode()
        return hmac.new(self._cache_key, message, hashlib.sha256).digest()

    def _cached(self, name: str, password: str) -> str | None:
        key = self._basic_key(name, password)
        now = time.monotonic()
        with self._lock:
            for stale in [k for k, (_, until) in self._basic_ok.items() if until <= now]:
                del self._basic_ok[stale]
            hit = self._basic_ok.get(key)
        return hit[0] if hit else None

    def check_password(self, name: str, password: str, address: str, *, via: str
                       ) -> str | Refusal:
        """The account's role, or why not; failures counted and slowed, all audited."""
        wait = self.throttle.wait_s(name, address)
        if wait > 0:
            audit.refused(reason="throttled", address=address, user=name,
                          retry_after_s=round(wait, 1))
            return Refusal(HTTPStatus.TOO_MANY_REQUESTS, "too many failed sign-ins", wait)
        account = self.users.verify(name, password) if self.users else None
        if account is None:
            self.throttle.failed(name, address)
            audit.refused(reason="wrong_name_or_password", address=address, user=name, via=via)
            return Refusal(HTTPStatus.UNAUTHORIZED, "wrong name or password")
        self.throttle.succeeded(name, address)
        audit.signed_in(user=name, role=account.role, address=address, via=via)
        return account.role

    def sign_in(self, name: str, password: str, address: str) -> tuple[str, Session] | Refusal:
        role = self.check_password(name, password, address, via="form")
        if isinstance(role, Refusal):
            return role
        return self.sessions.create(name, role)

    def sign_out(self, token: str, address: str) -> None:
        session = self.sessions.end(token)
        if session is not None:
            audit.signed_out(user=session.user, address=address)
