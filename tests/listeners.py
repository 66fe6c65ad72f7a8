"""Who owns a listening TCP port, read from /proc.

A peer or daemon a test starts is taken as started only once its own process
(the PID started, or a child of it) holds the listening socket on the port:
something else listening there (another suite's node or peer that got the same
number) is never taken for it. The kernel's LISTEN sockets come from
/proc/net/tcp and /proc/net/tcp6, each with its socket inode; a process holds
a socket when one of /proc/<pid>/fd/* links to ``socket:[inode]``.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

TCP_LISTEN = 0x0A  # the state column of /proc/net/tcp*
T = TypeVar("T")


class NotListening(AssertionError):
    """The process started did not come to listen on its port."""


class PortTaken(NotListening):
    """The port listens, but for another process than the one started."""


def listening_inodes(port: int, seen_by: int | None = None) -> set[int]:
    """Socket inodes of the LISTEN sockets on ``port`` (any address, IPv4 or IPv6), in this
    process's network namespace or in that of process ``seen_by``."""
    inodes: set[int] = set()
    where = "/proc/net" if seen_by is None else f"/proc/{seen_by}/net"
    for table in (f"{where}/tcp", f"{where}/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:  # no IPv6 in this kernel, or the process is gone
            continue
        for row in rows:
            fields = row.split()
            local, state, inode = fields[1], int(fields[3], 16), int(fields[9])
            if state == TCP_LISTEN and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(inode)
    return inodes


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process ``pid`` holds open (none if it is gone or not ours)."""
    inodes: set[int] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:["):-1]))
    return inodes


def _pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def process_tree(pid: int) -> set[int]:
    """``pid`` and every process descended from it, as /proc shows them now."""
    children: dict[int, list[int]] = defaultdict(list)
    for child in _pids():
        try:
            stat = Path(f"/proc/{child}/stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        children[int(stat.rsplit(")", 1)[1].split()[1])].append(child)
    tree: set[int] = set()
    todo = [pid]
    while todo:
        current = todo.pop()
        if current not in tree:
            tree.add(current)
            todo.extend(children[current])
    return tree


def command_line(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace") or "?"


def port_owners(port: int) -> list[int]:
    """PIDs of the processes holding a LISTEN socket on ``port`` that this user may see."""
    inodes = listening_inodes(port)
    return [pid for pid in _pids() if inodes and socket_inodes(pid) & inodes]


def describe_owners(port: int) -> str:
    owners = port_owners(port)
    if not owners:
        return "a process this user cannot see (another user's, or gone since)"
    return ", ".join(f"PID {pid} ({command_line(pid)})" for pid in owners)


def owns_listener(pid: int, port: int) -> bool:
    """Whether ``pid`` or a child of it holds a LISTEN socket on ``port`` now."""
    return _held_by(pid, listening_inodes(port))


def _held_by(pid: int, inodes: set[int]) -> bool:
    # The listeners are read before the processes: a socket listed was open
    # before the scan, in a process the scan finds (unless it exited meanwhile).
    return bool(inodes) and any(socket_inodes(p) & inodes for p in process_tree(pid))


def wait_for_own_listener(proc: subprocess.Popen, port: int, timeout: float,
                          what: str) -> None:
    """Return once ``proc`` (or a child of it) listens on ``port``.

    Raises :class:`PortTaken`, at once and naming the owner, when another
    process listens there (ours cannot bind it then); :class:`NotListening`
    when ``proc`` exits first or ``timeout`` seconds pass.
    """
    def ours() -> bool | None:
        # Read in the process's own network namespace: the same as ours unless it runs
        # in one of its own.
        listening = listening_inodes(port, proc.pid)
        if _held_by(proc.pid, listening):
            return True
        if listening:
            raise PortTaken(f"port {port} is held by {describe_owners(port)}, not by "
                            f"{what} (PID {proc.pid}, {_state(proc)})")
        return None

    wait_while_running(proc, ours, timeout, what, f" on port {port}")


def wait_while_running(proc: subprocess.Popen, found: Callable[[], T | None], timeout: float,
                       what: str, where: str = "") -> T:
    """Poll ``found`` until it returns a value; :class:`NotListening` if ``proc``
    (``what``, listening ``where``) exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while (value := found()) is None:
        code = proc.poll()
        if code is not None:
            raise NotListening(f"{what} (PID {proc.pid}) exited with code {code} before "
                               f"listening{where}")
        if time.monotonic() > deadline:
            raise NotListening(f"{what} (PID {proc.pid}) did not listen{where} within "
                               f"{timeout:g} s")
        time.sleep(0.05)
    return value


def _state(proc: subprocess.Popen) -> str:
    code = proc.poll()
    return "still running" if code is None else f"exited with code {code}"
