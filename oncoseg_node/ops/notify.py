"""systemd notification protocol (sd_notify) over the unix datagram socket.

Implemented directly (a few lines) rather than depending on libsystemd: the
protocol is one datagram of ``KEY=VALUE`` lines to ``$NOTIFY_SOCKET``.
Without that variable (not under systemd) every call is a no-op. A failed
send (systemd restarted, socket gone, a full buffer) is logged once and never
stops the node: the watchdog, if it misses pets, restarts it anyway.
"""

from __future__ import annotations

import os
import socket

import structlog

log = structlog.get_logger("oncoseg_node.ops.notify")


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self.failures = 0
        if self.address and self.address.startswith("@"):
            self.address = "\0" + self.address[1:]  # abstract namespace socket

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *lines: str) -> None:
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(1.0)  # a datagram socket that blocks must not stall shutdown
                sock.connect(self.address)
                sock.sendall("\n".join(lines).encode())
            self.failures = 0
        except (OSError, ValueError) as exc:
            self.failures += 1
            if self.failures == 1:  # once: a missing socket would repeat every second
                log.warning("sd_notify_failed", address=self.address.replace("\0", "@"),
                            error=f"{type(exc).__name__}: {exc}")

    def ready(self, status: str = "") -> None:
        self.send("READY=1", *( [f"STATUS={status}"] if status else []))

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    @staticmethod
    def watchdog_interval_s() -> float | None:
        """Half of systemd's WatchdogSec, as sd_watchdog_enabled recommends."""
        usec = os.environ.get("WATCHDOG_USEC")
        if not usec or (os.environ.get("WATCHDOG_PID") not in (None, str(os.getpid()))):
            return None
        return int(usec) / 2_000_000
