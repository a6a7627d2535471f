"""systemd notification protocol (sd_notify) without libsystemd.

``notify("READY=1")`` sends one datagram to ``$NOTIFY_SOCKET``; outside systemd (variable
unset) it does nothing and returns False. ``Watchdog`` reads ``$WATCHDOG_USEC`` and pings at
half that period, the interval systemd recommends.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


def _address(env: Mapping[str, str]) -> str | None:
    addr = env.get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr.startswith("@"):
        return "\0" + addr[1:]  # abstract namespace
    if addr.startswith("/"):
        return addr
    log.debug("NOTIFY_SOCKET %r is not a unix socket path; ignored", addr)  # e.g. vsock:
    return None


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``, ``"STATUS=..."``); True if the datagram was sent."""
    addr = _address(os.environ if env is None else env)
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(1.0)  # never block the daemon on a wedged manager
            sock.connect(addr)
            sock.sendall(state.encode("utf-8"))
        return True
    except OSError as exc:
        log.warning("sd_notify failed: %s", exc.strerror or exc)
        return False


def ready(status: str | None = None) -> bool:
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def reloading() -> bool:
    return notify("RELOADING=1")


def stopping() -> bool:
    return notify("STOPPING=1")


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


class Watchdog:
    """``WatchdogSec=`` support: ping at ``interval()`` while the daemon is really alive."""

    def __init__(self, env: Mapping[str, str] | None = None):
        self._env = dict(os.environ if env is None else env)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def interval(self) -> float | None:
        """Seconds between pings (half of ``$WATCHDOG_USEC``), or None if no watchdog is wanted."""
        usec = self._env.get("WATCHDOG_USEC")
        pid = self._env.get("WATCHDOG_PID")
        if pid and pid.isdigit() and int(pid) != os.getpid():
            return None  # the watchdog is meant for another process (e.g. we are a child)
        try:
            value = int(usec) if usec else 0
        except ValueError:
            return None
        return value / 2 / 1_000_000 if value > 0 else None

    @property
    def enabled(self) -> bool:
        return self.interval() is not None

    def ping(self) -> bool:
        return notify("WATCHDOG=1", self._env)

    def start(self, alive: Callable[[], bool]) -> bool:
        """Ping from a thread, but only while ``alive()`` says the daemon makes progress.

        A thread that pings unconditionally would hide a hung daemon; ``alive`` should check
        e.g. that the main loop ticked recently. Returns False when no watchdog is configured.
        """
        period = self.interval()
        if period is None or self._thread is not None:
            return False

        def run() -> None:
            while not self._stop.wait(period):
                try:
                    ok = alive()
                except Exception:
                    log.exception("watchdog liveness check raised")
                    ok = False
                if ok:
                    self.ping()
                else:
                    log.warning("watchdog: daemon not alive; not pinging (systemd will restart it)")

        self._stop.clear()
        self._thread = threading.Thread(target=run, name="sd-watchdog", daemon=True)
        self._thread.start()
        return True

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
