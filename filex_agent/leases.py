"""Who owns an upload: an owner id per process and a heartbeat that keeps its leases alive.

A worker sends a submission only while it holds the submission's lease (``Store.begin_upload``);
every write it makes carries the fencing epoch it got then. The heartbeat renews all of this
process's leases every third of ``journal.lease_seconds``. A process that dies or stalls stops
renewing; once its leases run out another process (or its own successor) takes them over with
a higher epoch, and the stalled one's late writes are refused.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from typing import Callable

from filex_agent.config import Config
from filex_agent.store import Store

log = logging.getLogger(__name__)


def node_name(config: Config) -> str:
    return config.journal.node_name or socket.gethostname()


def new_owner(config: Config, role: str = "run") -> str:
    """``node:pid:nonce:role``: unique per process start, and says where it ran."""
    return f"{node_name(config)}:{os.getpid()}:{secrets.token_hex(4)}:{role}"


def owner_is_dead_here(owner: str | None, node: str) -> bool:
    """True when ``owner`` ran on this node and its process is gone (so its leases can go now,
    without waiting for them to expire). False whenever that cannot be known for sure."""
    if not owner:
        return True
    parts = owner.split(":")
    if len(parts) < 3 or parts[0] != node or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return False  # a lease of this very process (a previous Daemon object in the same process)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Heartbeat:
    """Renews ``owner``'s leases every ``lease_seconds / 3`` in a thread of its own (a busy
    scheduler must not cost a lease). ``on_lost`` is told the ids whose leases were lost."""

    def __init__(self, store: Store, owner: str, lease_seconds: float,
                 held: Callable[[], set[int]], on_lost: Callable[[set[int]], None] | None = None,
                 leadership: "Leadership | None" = None):
        self.leadership = leadership
        self.store = store
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.held = held
        self.on_lost = on_lost
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def beat(self) -> None:
        kept = self.store.renew_leases(self.owner, self.lease_seconds)
        lost = self.held() - kept
        if lost and self.on_lost is not None:
            self.on_lost(lost)
        if self.leadership is not None:
            self.leadership.beat()

    def _run(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            try:
                self.beat()
            except Exception as exc:  # noqa: BLE001 - keep beating; the journal may be back soon
                log.warning("lease heartbeat failed: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


# Work that must run on one agent at a time when several share a journal.
SINGLETONS = ("tracking", "feedback", "audit-sweep", "alerts")


class Leadership:
    """Which singletons this process runs, decided through the journal (``Store.try_lead``),
    and this node's heartbeat row (``Store.heartbeat_node``). ``beat()`` runs on the lease
    heartbeat, every third of ``lease_seconds``: a leader that dies, stalls or loses the journal
    stops renewing and another node takes over once its lease ran out.

    ``leads(name)`` is also bounded by this process's own clock: a lead not renewed for most of
    a lease is treated as lost, so a process resumed after a long pause (SIGSTOP, VM freeze)
    does not act as leader on a lease that expired meanwhile."""

    def __init__(self, store: Store, owner: str, node: str, lease_seconds: float,
                 info: Callable[[], dict], *, always: bool = False, names: tuple[str, ...] = SINGLETONS):
        self.store = store
        self.owner = owner
        self.node = node
        self.lease_seconds = lease_seconds
        self.info = info
        # True when this process holds the journal alone (SQLite instance lock): it leads always.
        self.always = always
        self.names = names
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def beat(self) -> None:
        self.store.heartbeat_node(self.node, self.info())
        for name in self.names:
            sent = time.monotonic()
            won = self.store.try_lead(name, self.owner, self.lease_seconds)
            with self._lock:
                if won:
                    # Counted from before the request: the journal's lease began no earlier.
                    self._until[name] = sent + self.lease_seconds * 0.8
                else:
                    self._until.pop(name, None)

    def leads(self, name: str) -> bool:
        if self.always:
            return True
        with self._lock:
            return time.monotonic() < self._until.get(name, 0.0)

    def resign(self) -> None:
        """Clean stop: hand every lead over now rather than after the lease."""
        with self._lock:
            held = [n for n, until in self._until.items() if until > time.monotonic()]
            self._until.clear()
        for name in held:
            try:
                self.store.resign(name, self.owner)
            except Exception as exc:  # noqa: BLE001 - the lease runs out anyway
                log.warning("resigning the lead of %s failed: %s", name, exc)
