"""systemd's notification protocol (sd_notify(3)) without libsystemd: one datagram to $NOTIFY_SOCKET.

The units run with ``Type=notify``: READY=1 once serving, RELOADING=1 / READY=1 around a
SIGHUP reload, STOPPING=1 on the way out, and WATCHDOG=1 at half of ``WatchdogSec=`` while the
main loop turns. Outside systemd (no NOTIFY_SOCKET) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = ["notify", "reloading", "watchdog_interval_s"]

logger = logging.getLogger(__name__)


def notify(*states: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``KEY=value`` lines to the service manager; whether a socket was there to take them.

    A failure is logged at debug level and never raised: the service runs on without it.
    """
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # Linux abstract namespace
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        logger.debug("NOTIFY_SOCKET %r: only unix socket paths are supported", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(states).encode())
    except OSError as exc:
        logger.debug("sd_notify %s: %s", ", ".join(states), exc)
        return False
    return True


def reloading(environ: Mapping[str, str] | None = None) -> bool:
    """RELOADING=1 with the monotonic timestamp systemd asks for; send READY=1 when done."""
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}", environ=environ)


def watchdog_interval_s(environ: Mapping[str, str] | None = None) -> float | None:
    """How often to send WATCHDOG=1 (half of WatchdogSec=), or None when no watchdog is set for
    this process."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
        pid = int(env.get("WATCHDOG_PID", "0") or 0)
    except ValueError:
        return None
    if usec <= 0 or (pid and pid != os.getpid()):
        return None
    return usec / 2_000_000
