"""The HTTP pages' local accounts: one JSON file of names, roles and argon2 hashes.

The file (``http.auth.users_file``) is written by ``oncoseg-node users`` and
read by the running node, which notices a change by its modification time,
so an account added or removed counts from the next sign-in without a
restart. It must be readable by the node's user only (0600): a file others
can read is refused, by the command and by the node. Passwords are stored
as argon2id hashes (argon2-cffi's defaults, RFC 9106's low-memory profile);
a password itself is never stored, logged or taken as a command argument.
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import structlog
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from oncoseg_node.config import ROLES, private_file_problem
from oncoseg_node.durable import write_durably
from oncoseg_node.errors import OncosegError

log = structlog.get_logger("oncoseg_node.ops.users")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD = 10
FILE_VERSION = 1
_hasher = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the name is unknown, so that a wrong name takes as
    long as a wrong password and names cannot be told apart by timing (made at
    first use: a node without accounts never pays for it)."""
    return _hasher.hash("no such account, same cost")


@dataclass(frozen=True)
class Account:
    name: str
    role: str
    password_hash: str


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise OncosegError(f"account name {name!r}: letters, digits and . _ @ - only "
                           "(1-64, starting with a letter or digit)")
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise OncosegError(f"role {role!r} is not one of {', '.join(ROLES)}")
    return role


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise OncosegError(f"a password needs at least {MIN_PASSWORD} characters")
    return _hasher.hash(password)


def read_accounts(path: Path) -> dict[str, Account]:
    """Every account in ``path`` (none when it does not exist); refused when others can read it."""
    if not path.exists():
        return {}
    if (problem := private_file_problem(path)) is not None:
        raise OncosegError(f"accounts file {problem}")
    try:
        raw = json.loads(path.read_text())
        return {name: Account(check_name(name), check_role(entry["role"]), str(entry["hash"]))
                for name, entry in raw["users"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise OncosegError(f"accounts file {str(path)!r} is damaged ({exc}); "
                           "restore it or remove it and add the accounts again") from None


def write_accounts(path: Path, accounts: dict[str, Account]) -> None:
    """Replace the file atomically, mode 0600 whatever the umask."""
    body = {"version": FILE_VERSION,
            "users": {a.name: {"role": a.role, "hash": a.password_hash}
                      for a in sorted(accounts.values(), key=lambda a: a.name)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_durably(path, (json.dumps(body, indent=2) + "\n").encode())
    os.chmod(path, 0o600)


class UserStore:
    """The running node's view of the accounts file, re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._accounts: dict[str, Account] = {}

    def _current(self) -> dict[str, Account]:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_mode)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                try:
                    self._accounts = read_accounts(self.path)
                except OncosegError as exc:
                    # Nobody signs in on a file that cannot be trusted.
                    self._accounts = {}
                    log.error("accounts_file_refused", reason=str(exc))
                self._stamp = stamp
            return self._accounts

    def verify(self, name: str, password: str) -> Account | None:
        """The account when ``password`` is its password; the same cost either way."""
        account = self._current().get(name)
        try:
            _hasher.verify(account.password_hash if account else _dummy_hash(), password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        return account

    def role_of(self, name: str) -> str | None:
        """The account's role now (None once removed): sessions follow the file."""
        account = self._current().get(name)
        return account.role if account else None

    def stored_hash(self, name: str) -> str | None:
        account = self._current().get(name)
        return account.password_hash if account else None
