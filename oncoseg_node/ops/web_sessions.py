"""Signed-in sessions of the HTTP pages, and the slowing of repeated sign-in failures.

A session is a random token held in the browser's cookie (HttpOnly, Secure,
SameSite=Strict) and in this process's memory only: a restart signs
everyone out, and a token replayed after sign-out, after ``idle_s`` without
a request or after ``MAX_AGE_S`` is unknown. Each session has its own CSRF
token that every state-changing request must carry. The sign-in form's own
CSRF token (there is no session yet) is an HMAC of a timestamp under a key
made at start.

Failures are counted per account and per address; past a few, each further
try waits a doubling delay (answered 429 with ``Retry-After``, the password
not even checked), so guessing is slow without a pool thread ever sleeping.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_AGE_S = 12 * 3600.0  # signed in at most a working day, however active
SIGNIN_TOKEN_AGE_S = 3600.0
FREE_FAILURES_PER_ACCOUNT = 5
FREE_FAILURES_PER_ADDRESS = 10
FIRST_DELAY_S = 2.0
MAX_DELAY_S = 900.0
MAX_TRACKED = 10_000  # failure records kept; the oldest go first


@dataclass
class Session:
    user: str
    role: str
    csrf: str
    created: float
    last_seen: float


class SessionStore:
    def __init__(self, idle_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_s = idle_s
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._signin_key = secrets.token_bytes(32)

    def _now(self) -> float:
        return self._clock()

    def create(self, user: str, role: str) -> tuple[str, Session]:
        token = secrets.token_urlsafe(32)
        now = self._now()
        session = Session(user, role, secrets.token_urlsafe(24), now, now)
        with self._lock:
            self._expire(now)
            self._sessions[token] = session
        return token, session

    def get(self, token: str) -> Session | None:
        """The live session of ``token`` (its idle clock restarted), or None."""
        now = self._now()
        with self._lock:
            session = self._sessions.get(token)
            if session is None:
                return None
            if now - session.last_seen > self.idle_s or now - session.created > MAX_AGE_S:
                del self._sessions[token]
                return None
            session.last_seen = now
            return session

    def end(self, token: str) -> Session | None:
        with self._lock:
            return self._sessions.pop(token, None)

    def end_user(self, user: str) -> None:
        with self._lock:
            for token in [t for t, s in self._sessions.items() if s.user == user]:
                del self._sessions[token]

    def _expire(self, now: float) -> None:
        for token in [t for t, s in self._sessions.items()
                      if now - s.last_seen > self.idle_s or now - s.created > MAX_AGE_S]:
            del self._sessions[token]

    def signin_token(self) -> str:
        stamp = str(int(time.time()))
        mac = hmac.new(self._signin_key, stamp.encode(), hashlib.sha256).hexdigest()
        return f"{stamp}.{mac}"

    def signin_token_ok(self, token: str) -> bool:
        stamp, _, mac = token.partition(".")
        if not stamp.isdigit():
            return False
        expected = hmac.new(self._signin_key, stamp.encode(), hashlib.sha256).hexdigest()
        return (hmac.compare_digest(mac, expected)
                and 0 <= time.time() - int(stamp) <= SIGNIN_TOKEN_AGE_S)


@dataclass
class _Failures:
    count: int = 0
    blocked_until: float = 0.0


@dataclass
class FailureThrottle:
    """Doubling delays after repeated sign-in failures, per account and per address."""

    first_delay_s: float = FIRST_DELAY_S
    clock: Callable[[], float] = time.monotonic
    _records: dict[tuple[str, str], _Failures] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _now(self) -> float:
        return self.clock()

    def wait_s(self, user: str, address: str) -> float:
        """Seconds until a try for ``user`` from ``address`` is heard; 0 when it is now."""
        now = self._now()
        with self._lock:
            until = max((r.blocked_until for r in
                         (self._records.get(("user", user)), self._records.get(("addr", address)))
                         if r is not None), default=0.0)
        return max(0.0, until - now)

    def failed(self, user: str, address: str) -> None:
        now = self._now()
        with self._lock:
            for key, free in ((("user", user), FREE_FAILURES_PER_ACCOUNT),
                              (("addr", address), FREE_FAILURES_PER_ADDRESS)):
                record = self._records.pop(key, None) or _Failures()
                record.count += 1
                if record.count >= free:
                    delay = self.first_delay_s * 2 ** (record.count - free)
                    record.blocked_until = now + min(delay, MAX_DELAY_S)
                self._records[key] = record  # re-inserted: the dict stays oldest first
            while len(self._records) > MAX_TRACKED:
                del self._records[next(iter(self._records))]

    def succeeded(self, user: str, address: str) -> None:
        with self._lock:
            self._records.pop(("user", user), None)
            self._records.pop(("addr", address), None)
