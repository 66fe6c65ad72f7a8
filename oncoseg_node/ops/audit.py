"""Who looked at what: one JSON log line per view of patient data, sign-in and refusal.

Every line carries ``audit: true`` (as the series received and structure
sets delivered do), the user and role (None where the node has no
accounts: loopback only), the client's address, and for a view the job and
what was fetched. Passwords, tokens and cookies are never among the fields:
callers pass names and outcomes only.
"""

from __future__ import annotations

from typing import Any

import structlog

log = structlog.get_logger("oncoseg_node.audit")


def viewed(*, user: str | None, role: str | None, address: str, fetched: str,
           job_id: int | None, status: int, via: str) -> None:
    """A page, slice image or download was asked for (``status`` says whether it was given)."""
    log.info("http_view", audit=True, user=user, role=role, address=address, job_id=job_id,
             fetched=fetched, status=status, via=via)


def signed_in(*, user: str, role: str, address: str, via: str) -> None:
    log.info("http_sign_in", audit=True, user=user, role=role, address=address, via=via)


def signed_out(*, user: str, address: str) -> None:
    log.info("http_sign_out", audit=True, user=user, address=address)


def refused(*, reason: str, address: str, user: str | None = None, **detail: Any) -> None:
    """A failed sign-in, a throttled try, a forged proxy header, a missing CSRF token."""
    log.warning("http_refused", audit=True, reason=reason, user=user, address=address,
                **detail)
