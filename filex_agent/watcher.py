"""Outbox watcher: decides WHEN a file dropped in a route's outbox is ready to be taken.

It never moves, reads or deletes files: it calls ``on_ready(Candidate)`` and the daemon claims the file
with an atomic rename (which may fail if someone else was faster; the claim is idempotent).

Sources of knowledge, any of which may be missing or late, so none is trusted alone:
- watchdog events (inotify on Linux; a polling observer for ``poll = true`` routes, network shares);
- a full scan at start-up, every ``rescan_interval`` seconds, and on ``scan_now()``;
- an ``lstat`` of every pending file on each tick (~0.25 s), which is the final word on size and mtime.

Readiness, per route:
- ``stable``: unchanged (size and mtime_ns) for ``stable_seconds`` since the last change the watcher saw.
  With inotify, a file we have seen being written (create/modify event) is additionally held until the
  writer closes it (IN_CLOSE_WRITE): a writer that pauses longer than ``stable_seconds`` while holding the
  file open is not taken half-written. A missed close (inotify queue overflow, a hard link) only delays the
  file: it is taken after ``max(60 s, rescan_interval, stable_seconds)`` without change.
- ``trigger``: ``NAME + trigger_suffix`` exists beside ``NAME`` *and* ``NAME`` is stable as above (a trigger
  may be stale or written first); the trigger itself is never a candidate, and the claim consumes it.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from watchdog.events import (
    FileAttribEvent,
    FileClosedEvent,
    FileClosedNoWriteEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileOpenedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserverVFS

from filex_agent.config import RouteSettings

try:  # Linux: inotify with close-after-write events and unmatched moves reported as moves.
    from watchdog.observers.inotify import InotifyObserver
except Exception:  # pragma: no cover - non-Linux platforms
    InotifyObserver = None  # type: ignore[assignment,misc]

logger = logging.getLogger(__name__)

TICK_INTERVAL = 0.25
MIN_REEMIT_SECONDS = 60.0
# Re-check dead observers this often (well inside a typical systemd WatchdogSec).
RESTART_INTERVAL = 5.0
JOIN_TIMEOUT = 5.0


@dataclass(frozen=True)
class Candidate:
    """A file the watcher believes is ready to be claimed."""

    # RouteSettings holds lists (unhashable): keep it out of the hash.
    route: RouteSettings = field(hash=False)
    path: Path
    trigger: Path | None
    size: int
    mtime_ns: int
    is_symlink: bool


@dataclass
class _Entry:
    """What the watcher knows about one file currently in an outbox."""

    outbox: Path
    last_change: float
    key: tuple[int, int] | None = None  # (size, mtime_ns) at the last lstat
    is_symlink: bool = False
    # A write was seen (inotify) and no close-after-write since.
    writer_open: bool = False
    # An event arrived since the last lstat: re-check even if already emitted.
    dirty: bool = True
    emitted_key: tuple[int, int] | None = None
    emitted_at: float = 0.0


@dataclass
class _Watch:
    route: RouteSettings
    observer: BaseObserver | None = None
    # Whether this observer reports close-after-write (inotify); polling only reports stat diffs.
    close_events: bool = False
    failing: bool = False


def _outbox_key(route: RouteSettings) -> Path:
    return Path(os.path.abspath(route.outbox))


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: OutboxWatcher, outbox: Path) -> None:
        super().__init__()
        self._watcher = watcher
        self._outbox = outbox

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            self._watcher._on_event(self._outbox, event)
        except Exception:  # never let a bug here kill the observer thread
            logger.exception("outbox watcher: error handling %s", type(event).__name__)


class OutboxWatcher:
    def __init__(
        self,
        routes: list[RouteSettings],
        on_ready: Callable[[Candidate], None],
        *,
        rescan_interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        poll_interval: float = 1.0,
        on_ready_batch: Callable[[list[Candidate]], None] | None = None,
    ) -> None:
        if rescan_interval <= 0:
            raise ValueError("rescan_interval must be > 0")
        self._on_ready = on_ready
        # Given, it gets each tick's ready files at once (claimed with one journal write per batch).
        self._on_ready_batch = on_ready_batch
        self._rescan_interval = rescan_interval
        self._clock = clock
        self._poll_interval = poll_interval
        self._lock = threading.RLock()  # guards _watches and _entries
        self._tick_lock = threading.RLock()  # one tick at a time, callbacks in order
        self._watches: dict[Path, _Watch] = {}
        self._entries: dict[Path, _Entry] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False
        self._stopped = False
        self._last_scan = 0.0
        self._last_restart = 0.0
        self._watches = self._index(routes)

    # ----------------------------------------------------------------- public API

    @property
    def reemit_seconds(self) -> float:
        return max(MIN_REEMIT_SECONDS, self._rescan_interval)

    def start(self) -> None:
        """Create missing outboxes, start observers and the tick thread, scan every outbox once."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("OutboxWatcher cannot be restarted after stop()")
            if self._started:
                return
            self._make_outboxes(w.route for w in self._watches.values())
            self._started = True
            for outbox, w in self._watches.items():
                self._start_observer(outbox, w)
        self.scan_now()
        self._last_scan = self._last_restart = self._clock()
        self._thread = threading.Thread(target=self._run, name="filex-outbox-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop observers and the tick thread; bounded joins; safe to call twice."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._stop.set()
            watches = list(self._watches.values())
        for w in watches:
            self._stop_observer(w)
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(JOIN_TIMEOUT)
            if t.is_alive():
                logger.warning("outbox watcher thread did not stop within %.0f s (callback still running?)",
                               JOIN_TIMEOUT)

    def healthy(self) -> bool:
        """Tick thread and every observer (and its emitter threads) alive."""
        t = self._thread
        if t is None or not t.is_alive() or self._stop.is_set():
            return False
        with self._lock:
            return all(self._observer_alive(w) for w in self._watches.values())

    def scan_now(self) -> None:
        """List every outbox and start tracking files not yet known (vanished ones drop out at the next tick)."""
        with self._lock:
            routes = [(k, w.route) for k, w in self._watches.items()]
        for outbox, route in routes:
            try:
                names = self._list(outbox)
            except OSError as exc:
                logger.error("route %s: cannot list outbox %s: %s", route.name, outbox, exc.strerror or exc)
                continue
            now = self._clock()
            with self._lock:
                if outbox not in self._watches:  # route removed meanwhile
                    continue
                for name in names:
                    self._track(outbox, self._watches[outbox].route, name, now, poke=False)

    def tick(self) -> None:
        """Evaluate pending files now and call on_ready for those ready."""
        with self._tick_lock:
            ready = self._evaluate()
            if self._on_ready_batch is not None and ready:
                try:
                    self._on_ready_batch(ready)
                except Exception:
                    logger.exception("on_ready failed for %d file(s)", len(ready))
                return
            for cand in ready:
                try:
                    self._on_ready(cand)
                except Exception:
                    logger.exception("route %s: on_ready failed for %s", cand.route.name, cand.path.name)

    def set_routes(self, routes: list[RouteSettings]) -> None:
        """Replace the route set: new outboxes are created and watched, removed ones dropped."""
        new = self._index(routes)
        with self._lock:
            if self._started and not self._stopped:
                # Raise before changing anything: a reload that cannot apply leaves the old set running.
                self._make_outboxes(w.route for k, w in new.items() if k not in self._watches)
            old = self._watches
            to_stop: list[_Watch] = []
            for outbox, w in old.items():
                nw = new.get(outbox)
                if nw is not None and nw.route.poll == w.route.poll:
                    w.route = nw.route  # same folder, same observer kind: keep it running
                    new[outbox] = w
                else:
                    to_stop.append(w)
            self._watches = new
            for path in [p for p, e in self._entries.items() if e.outbox not in new]:
                del self._entries[path]
            running = self._started and not self._stopped
            to_start = [(k, w) for k, w in new.items() if w.observer is None and running]
        for w in to_stop:
            self._stop_observer(w)
        if running:
            with self._lock:
                for outbox, w in to_start:
                    self._start_observer(outbox, w)
            self.scan_now()

    # ----------------------------------------------------------------- internals

    @staticmethod
    def _index(routes: Iterable[RouteSettings]) -> dict[Path, _Watch]:
        out: dict[Path, _Watch] = {}
        for r in routes:
            k = _outbox_key(r)
            if k in out:
                raise ValueError(f"routes {out[k].route.name!r} and {r.name!r} share the outbox {k}")
            out[k] = _Watch(route=r)
        return out

    @staticmethod
    def _make_outboxes(routes: Iterable[RouteSettings]) -> None:
        for r in routes:
            k = _outbox_key(r)
            try:
                k.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OSError(exc.errno, f"route {r.name}: cannot create outbox {k}: {exc.strerror}") from None

    # Folders already reported, so a rescan every minute does not repeat the message forever.
    _reported_dirs: set[Path] = set()

    @classmethod
    def _list(cls, outbox: Path) -> list[str]:
        names = []
        with os.scandir(outbox) as it:
            for entry in it:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        # Subfolders are not descended; say so once (the agent's own spool is dotted).
                        path = outbox / entry.name
                        if not entry.name.startswith(".") and path not in cls._reported_dirs:
                            cls._reported_dirs.add(path)
                            logger.warning("outbox %s: folder %r ignored: only files directly in an outbox are "
                                        "submitted (move its files up one level)", outbox, entry.name)
                        continue
                except OSError:
                    continue
                names.append(entry.name)
        return names

    def _start_observer(self, outbox: Path, w: _Watch) -> None:
        """Start an observer for one outbox; inotify failures (e.g. watch limit) fall back to polling."""
        handler = _Handler(self, outbox)
        kinds: list[str] = ["poll"] if w.route.poll else ["native", "poll"]
        for kind in kinds:
            obs: BaseObserver
            if kind == "poll":
                # lstat: never follow symlinks (size of the link, dangling links still seen).
                obs = PollingObserverVFS(os.lstat, os.scandir, polling_interval=self._poll_interval)
            elif InotifyObserver is not None:
                obs = InotifyObserver(generate_full_events=True)
            else:  # pragma: no cover - non-Linux
                obs = Observer()
            try:
                obs.schedule(handler, str(outbox), recursive=False)
                obs.start()
            except Exception as exc:
                try:
                    obs.stop()
                except Exception:
                    pass
                logger.error("route %s: cannot watch %s with the %s observer: %s", w.route.name, outbox, kind, exc)
                continue
            if kind == "poll" and not w.route.poll:
                logger.warning("route %s: watching %s by polling (inotify unavailable)", w.route.name, outbox)
            w.observer = obs
            w.close_events = kind == "native" and InotifyObserver is not None
            if w.failing:
                logger.info("route %s: watching %s again", w.route.name, outbox)
            w.failing = False
            return
        w.observer = None
        w.failing = True

    @staticmethod
    def _stop_observer(w: _Watch) -> None:
        obs, w.observer = w.observer, None
        if obs is None:
            return
        try:
            obs.stop()
            if obs.is_alive():
                obs.join(JOIN_TIMEOUT)
        except Exception:
            logger.exception("route %s: error stopping observer", w.route.name)

    @staticmethod
    def _observer_alive(w: _Watch) -> bool:
        obs = w.observer
        if obs is None or not obs.is_alive():
            return False
        emitters = list(obs.emitters)
        return bool(emitters) and all(e.is_alive() for e in emitters)

    def _restart_dead_observers(self) -> None:
        with self._lock:
            dead = [(k, w) for k, w in self._watches.items() if not self._observer_alive(w)]
            for outbox, w in dead:
                if not w.failing:
                    logger.error("route %s: observer for %s stopped (outbox deleted or unmounted?)",
                                 w.route.name, outbox)
                w.failing = True
        # Stopped outside the lock: the observer's dispatch thread may be waiting for it in _on_event.
        for _, w in dead:
            self._stop_observer(w)
        with self._lock:
            for outbox, w in dead:
                # Not recreated here: a missing folder may be an unmounted share. Rescans still cover it.
                if (self._watches.get(outbox) is w and w.observer is None and not self._stop.is_set()
                        and outbox.is_dir()):
                    self._start_observer(outbox, w)

    def _run(self) -> None:
        while not self._stop.wait(TICK_INTERVAL):
            try:
                now = self._clock()
                if now - self._last_restart >= RESTART_INTERVAL:
                    self._last_restart = now
                    self._restart_dead_observers()
                if now - self._last_scan >= self._rescan_interval:
                    self._last_scan = now
                    self.scan_now()
                self.tick()
            except Exception:  # keep watching whatever happens
                logger.exception("outbox watcher: tick failed")

    def _track(self, outbox: Path, route: RouteSettings, name: str, now: float, *, poke: bool) -> _Entry | None:
        """Entry for outbox/name if the route wants it (creating it); caller holds the lock."""
        if not route.wants(name):
            return None
        path = outbox / name
        e = self._entries.get(path)
        if e is None:
            e = _Entry(outbox=outbox, last_change=now)
            self._entries[path] = e
        elif poke:
            e.dirty = True
        return e

    def _on_event(self, outbox: Path, event: FileSystemEvent) -> None:
        if event.is_directory or isinstance(event, (FileOpenedEvent, FileClosedNoWriteEvent)):
            return  # readers (the daemon, a virus scanner) open and close files: no change
        now = self._clock()
        with self._lock:
            w = self._watches.get(outbox)
            if w is None:
                return
            route = w.route
            src = os.fsdecode(event.src_path) if event.src_path else ""
            dest = os.fsdecode(event.dest_path) if event.dest_path else ""
            if isinstance(event, (FileDeletedEvent, FileMovedEvent)) and src:
                self._entries.pop(Path(src), None)
                self._poke_trigger_owner(outbox, route, Path(src), now)
            if isinstance(event, FileMovedEvent):
                if dest and Path(dest).parent == outbox:
                    # A rename into the outbox is the end of a write (write-then-rename convention).
                    e = self._track(outbox, route, Path(dest).name, now, poke=True)
                    if e is not None:
                        e.last_change, e.writer_open = now, False
                    self._poke_trigger_owner(outbox, route, Path(dest), now)
                return
            if isinstance(event, FileDeletedEvent) or not src or Path(src).parent != outbox:
                return
            path = Path(src)
            self._poke_trigger_owner(outbox, route, path, now)
            e = self._track(outbox, route, path.name, now, poke=True)
            if e is None:
                return
            if isinstance(event, (FileCreatedEvent, FileModifiedEvent)):
                e.last_change = now
                if w.close_events:
                    e.writer_open = True
            elif isinstance(event, FileClosedEvent):
                e.last_change, e.writer_open = now, False
            elif isinstance(event, FileAttribEvent):
                pass  # a touch changes mtime, which the next lstat sees; chmod alone changes nothing we use

    def _poke_trigger_owner(self, outbox: Path, route: RouteSettings, path: Path, now: float) -> None:
        """An event on NAME.done: make sure NAME is looked at on the next tick."""
        suffix = route.trigger_suffix
        if route.readiness != "trigger" or not suffix or not path.name.endswith(suffix):
            return
        data = path.name[: -len(suffix)]
        if data and (outbox / data) != path:
            self._track(outbox, route, data, now, poke=True)

    def _evaluate(self) -> list[Candidate]:
        now = self._clock()
        reemit = self.reemit_seconds
        ready: list[Candidate] = []
        with self._lock:
            items = list(self._entries.items())
        for path, e in items:
            with self._lock:
                w = self._watches.get(e.outbox)
                if self._entries.get(path) is not e:
                    continue  # dropped or replaced meanwhile
                if w is None or not w.route.wants(path.name):
                    del self._entries[path]  # route removed or patterns changed by a reload
                    continue
                route = w.route
                due = e.emitted_key is None or e.dirty or now - e.emitted_at >= reemit
                if not due:
                    continue  # already emitted: no stat until an event or re-emission time
            try:
                st = os.lstat(path)  # outside the lock: a network share can be slow
            except OSError:
                st = None
            trigger: Path | None = None
            trigger_present = False
            if route.readiness == "trigger" and st is not None:
                trigger = path.with_name(path.name + route.trigger_suffix)
                trigger_present = os.path.lexists(trigger)
            with self._lock:
                if self._entries.get(path) is not e:
                    continue
                if st is None or not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                    # Vanished, or a directory/fifo/socket: forget it (a fifo would block a reader).
                    del self._entries[path]
                    continue
                e.dirty = False
                key = (st.st_size, st.st_mtime_ns)
                if key != e.key:
                    if e.key is not None:
                        e.last_change = now
                    e.key = key
                    e.is_symlink = stat.S_ISLNK(st.st_mode)
                    if e.emitted_key is not None and e.emitted_key != key:
                        e.emitted_key = None  # changed after emission: wait for readiness again
                if e.emitted_key == key and now - e.emitted_at < reemit:
                    continue
                if route.readiness == "trigger" and not trigger_present:
                    continue
                # A trigger alone is not enough: it may be stale (left by a crash, or written
                # before the file as some producers do), so the file must be stable as well.
                quiet = now - e.last_change
                if quiet < route.stable_seconds:
                    continue
                if e.writer_open and not e.is_symlink and quiet < max(reemit, route.stable_seconds):
                    continue  # seen being written and not closed yet
                e.emitted_key, e.emitted_at = key, now
                ready.append(Candidate(route=route, path=path, trigger=trigger if trigger_present else None,
                                       size=key[0], mtime_ns=key[1], is_symlink=e.is_symlink))
        for c in ready:
            logger.debug("route %s: %s ready (%d bytes)", c.route.name, c.path.name, c.size)
        return ready
