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
                 held: Callable[[], set[int]], on_lost: Callable[[set[int]], None] | None = None):
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
