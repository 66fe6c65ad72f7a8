"""The sign-in form, and the signed-in user's name and sign-out button on every page.

Plain HTML forms, no script: the Content Security Policy admits no script
here, and forms post only to the node itself (``form-action 'self'``).
Everything shown is escaped.
"""

from __future__ import annotations

from html import escape

SIGNIN_CSP = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; " \
             "frame-ancestors 'none'"
STYLE = ("body{font-family:sans-serif;margin:4em auto;max-width:22em}"
         "label,input,button{display:block;width:100%;margin:.4em 0}"
         ".error{color:#b00}")


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a path on this node only, never another site."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/jobs"
    return target


def render_signin(*, title: str, csrf: str, next_path: str, message: str = "") -> str:
    error = f'<p class="error">{escape(message)}</p>' if message else ""
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Sign in: {escape(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{escape(title)}</h1>{error}"
            '<form method="post" action="/signin">'
            f'<input type="hidden" name="csrf" value="{escape(csrf)}">'
            f'<input type="hidden" name="next" value="{escape(safe_next(next_path))}">'
            '<label>Name <input name="user" autocomplete="username" required autofocus></label>'
            '<label>Password <input name="password" type="password" '
            'autocomplete="current-password" required></label>'
            '<button type="submit">Sign in</button></form></body></html>')


def signout_bar(*, user: str, role: str, csrf: str) -> str:
    """A small form naming who is signed in, with the sign-out button (POST, CSRF token)."""
    return ('<form id="signout" method="post" action="/signout" style="float:right">'
            f'<input type="hidden" name="csrf" value="{escape(csrf)}">'
            f'{escape(user)} ({escape(role)}) <button type="submit">Sign out</button></form>')


def with_bar(page: str, bar: str) -> str:
    """``page`` with ``bar`` first in its body."""
    head, marker, body = page.partition("<body>")
    return f"{head}{marker}{bar}{body}" if marker else bar + page
