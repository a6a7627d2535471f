"""The daemon: recovery, watcher, upload workers and scheduled tracking/feedback jobs.

Start-up order matters: the journal is reconciled (``recover``) before anything new is sent.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler

from filex_agent.config import Config, RouteSettings
from filex_agent.connections import Connections
from filex_agent.errors import FilexError, PermanentError
from filex_agent.feedback import FeedbackCollector
from filex_agent.fsutil import cleanup_partials
from filex_agent.hooks import Hooks, LoggingHooks, MultiHooks
from filex_agent.store import State, Store, Submission, open_store, utcnow
from filex_agent.submitter import Submitter
from filex_agent.tracker import Tracker, matches

log = logging.getLogger(__name__)


class Daemon:
    def __init__(self, config: Config, *, store: Store | None = None, hooks: Hooks | None = None,
                 dispatch_interval: float = 1.0):
        self.config = config
        self.store = store or open_store(config.journal_path, journal=config.journal)
        self.hooks = MultiHooks(LoggingHooks(), *([hooks] if hooks else []))
        self.connections = Connections(config, on_retry=self.hooks.retry)
        self.submitter = Submitter(config, self.store, self.connections, self.hooks)
        self.feedback = FeedbackCollector(config, self.store, self.connections, self.hooks)
        self.tracker = Tracker(config, self.store, self.connections, self.submitter, self.hooks)
        self.dispatch_interval = dispatch_interval
        self.executor = ThreadPoolExecutor(config.agent.workers, thread_name_prefix="upload")
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.watcher = None
        self._inflight: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._unconfirmed: set[int] = set()  # interrupted uploads recovery could not decide yet
        self._old_connections: list[Connections] = []
        self.started = False

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        from filex_agent.watcher import OutboxWatcher

        self.recover()
        self.watcher = OutboxWatcher(self.config.routes, self._on_candidate,
                                     rescan_interval=self.config.watcher.rescan_interval_seconds)
        self.watcher.start()
        t = self.config.tracking
        self.scheduler.add_job(self.dispatch, "interval", seconds=self.dispatch_interval, id="dispatch",
                               max_instances=1, coalesce=True, next_run_time=_now_local())
        self.scheduler.add_job(self.track_and_collect, "interval", seconds=t.poll_interval_seconds, id="track",
                               max_instances=1, coalesce=True, next_run_time=_now_local())
        self.scheduler.start()
        self.started = True
        log.info("filex-agent started: %d route(s)", len(self.config.routes))

    def stop(self, grace: float | None = None) -> bool:
        """Stop taking files; let uploads in flight (and a tracking cycle under way) finish within
        the grace period. True if everything finished; False if work was cut off (the journal
        has it as UPLOADING and the next start recovers it)."""
        if self._stopping.is_set():
            return True
        self._stopping.set()
        grace = self.config.agent.shutdown_grace_seconds if grace is None else grace
        deadline = time.monotonic() + grace
        if self.watcher is not None:
            self.watcher.stop()
        with self._lock:
            pending = list(self._inflight.values())
        # Jobs not yet started are dropped (their submissions are QUEUED in the journal).
        self.executor.shutdown(wait=False, cancel_futures=True)
        done = threading.Event()

        def _wait() -> None:
            for f in pending:
                try:
                    f.result()
                except BaseException:  # noqa: BLE001 - already logged by the worker (or cancelled)
                    pass
            if self.scheduler.running:
                self.scheduler.shutdown(wait=True)  # a tracking/feedback cycle under way ends cleanly
            done.set()

        waiter = threading.Thread(target=_wait, daemon=True)
        waiter.start()
        if pending:
            log.info("stopping: waiting up to %.0f s for %d upload(s) in flight", grace, len(pending))
        finished = done.wait(max(0.0, deadline - time.monotonic()))
        if not finished:
            log.warning("shutdown grace of %.0f s over with work in flight; it is recovered at next start", grace)
        for conns in [*self._old_connections, self.connections]:
            try:
                conns.close()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                log.debug("closing connections failed", exc_info=True)
        if finished:
            self.store.close()
        log.info("filex-agent stopped")
        return finished

    def reload(self, config: Config) -> None:
        """Apply a new config (SIGHUP): routes added or removed; work in flight is kept.

        A removed route with unfinished submissions stays known (not watched) until they end.
        """
        new_names = {r.name for r in config.routes}
        retired = [r for r in self.config.routes if r.name not in new_names
                   and any(not s.is_final for s in self.store.list(route=r.name))]
        effective = config.model_copy(update={"routes": list(config.routes) + retired})
        if self.watcher is not None:
            # First: it raises (new outbox cannot be created) before anything has changed.
            self.watcher.set_routes(list(config.routes))
        old = self.connections
        self.config = effective
        self.connections = Connections(effective, on_retry=self.hooks.retry)
        for part in (self.submitter, self.tracker, self.feedback):
            part.config = effective
            part.connections = self.connections
        self._old_connections.append(old)  # closed at stop: uploads in flight may still use them
        log.info("configuration reloaded: %d route(s)%s", len(config.routes),
                 f", {len(retired)} retired route(s) finishing their work" if retired else "")

    def healthy(self) -> bool:
        return self.started and self.scheduler.running and (self.watcher is None or self.watcher.healthy())

    def run_forever(self) -> int:
        stop = threading.Event()
        signals = 0

        def _handler(signum, frame):  # noqa: ARG001
            nonlocal signals
            signals += 1
            if signals > 1:
                log.warning("second signal: exiting now; the journal recovers the rest at next start")
                os._exit(1)
            log.info("signal %s: shutting down", signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, _handler)
        signal.signal(signal.SIGINT, _handler)
        self.start()
        while not stop.wait(0.2):
            pass
        if not self.stop():
            # Uploads still running would keep the interpreter alive (executor threads are joined
            # at exit): leave now; every interrupted step is in the journal for recovery.
            logging.shutdown()
            os._exit(0)
        return 0

    # -- pipeline ------------------------------------------------------------------------
    def _on_candidate(self, cand) -> None:
        if self._stopping.is_set():
            return
        try:
            sub = self.submitter.claim(cand.route, Path(cand.path), cand.trigger)
        except Exception:  # noqa: BLE001 - keep the watcher alive; the file stays in the outbox
            log.exception("claiming %s failed", cand.path)
            return
        if sub is not None and sub.state is State.QUEUED:
            self._submit(sub.id)

    def dispatch(self) -> None:
        """Start uploads for QUEUED submissions that are due, a few per worker at a time.

        Only the ids that can start soon are read: with 100,000 files queued, reading every row
        every second cost most of a core.
        """
        if self._stopping.is_set():
            return
        with self._lock:
            room = 2 * self.config.agent.workers - len(self._inflight)
        if room <= 0:
            return
        for sub_id in self.store.due(utcnow(), room + len(self._inflight)):
            self._submit(sub_id)

    def _submit(self, sub_id: int) -> None:
        with self._lock:
            if sub_id in self._inflight or self._stopping.is_set():
                return
            try:
                fut = self.executor.submit(self._upload, sub_id)
            except RuntimeError:  # executor shut down
                return
            self._inflight[sub_id] = fut

    def _upload(self, sub_id: int) -> None:
        try:
            self.submitter.upload(sub_id)
        except Exception:  # noqa: BLE001
            log.exception("submission %s: upload worker failed", sub_id)
        finally:
            with self._lock:
                self._inflight.pop(sub_id, None)

    def track_and_collect(self) -> None:
        try:
            self.recheck_interrupted()
        except Exception:  # noqa: BLE001
            log.exception("re-checking interrupted uploads failed")
        try:
            self.tracker.poll()
        except Exception:  # noqa: BLE001
            log.exception("tracking cycle failed")
        try:
            self.feedback.collect_all()
        except Exception:  # noqa: BLE001
            log.exception("feedback cycle failed")

    # -- recovery ------------------------------------------------------------------------
    def recover(self) -> None:
        """Reconcile every non-final submission with the disk and fileX before sending anything."""
        for route in self.config.routes:
            cleanup_partials(route.folder("feedback", self.config.agent.data_dir))
            _cleanup_spool(route)
        for sub in self.store.list([State.CLAIMING]):
            self._recover_claim(sub)
        for sub in self.store.list([State.UPLOADING]):
            self._recover_upload(sub)
        for sub in self.store.list():
            if sub.move_to:
                self.submitter.finish_move(sub)

    def _recover_claim(self, sub: Submission) -> None:
        src, dst = Path(sub.source_path), Path(sub.local_path)
        if dst != src and dst.exists():
            sub = self.store.transition(sub.id, State.QUEUED, "recovered: claim completed")
            self.submitter.validate(sub)
        else:
            # The rename never happened (or the file is gone): finish or close the claim now,
            # before the watcher starts.
            self.submitter.complete_claim(sub)

    def settle_seconds(self) -> float:
        """How long fileX may take to show an upload that a crash interrupted (object moved out
        of ``in`` but no tracking record yet) before the agent concludes it never arrived."""
        t = self.config.tracking
        return min(t.match_timeout_seconds, max(30.0, 2 * t.poll_interval_seconds))

    def _recover_upload(self, sub: Submission) -> None:
        """An upload was cut off: SUBMITTED if fileX has it, QUEUED again only when it surely has not.

        fileX may not show a just-finished upload at once, so "no evidence" is final only when no
        byte can have left (REST without a tracking id: the id is journaled before the PUT) or
        after ``settle_seconds``; until then the submission stays UPLOADING and is checked again
        every tracking cycle, never re-sent blindly.
        """
        with self._lock:
            self._unconfirmed.discard(sub.id)
        try:
            route = self.config.route(sub.route)
            evidence, rec_id = self._remote_evidence(route, sub)
        except FilexError as exc:
            log.warning("submission %s: cannot check fileX for an interrupted upload (%s); will check again",
                        sub.id, exc)
            self._defer(sub, f"upload interrupted; fileX could not be checked yet: {exc}")
            return
        if evidence:
            fields = {"tracking_id": rec_id} if rec_id and rec_id != sub.tracking_id else {}
            sub = self.store.transition(sub.id, State.SUBMITTED, f"recovered: fileX has it ({evidence})",
                                        uploaded_at=utcnow(), upload_location=f"{route.org}/{route.application}/in",
                                        flag=None, next_attempt_at=None,
                                        move_to=self.submitter.archive_dir(sub, "sent"), **fields)
            self.submitter.finish_move(sub)
            self.hooks.submission_changed(sub, "recovered")
            return
        nothing_sent = sub.transport == "rest" and not sub.tracking_id
        if nothing_sent or (sub.next_attempt_at is not None and utcnow() >= sub.next_attempt_at):
            why = ("no byte had been sent" if nothing_sent else
                   f"fileX shows no trace of it {self.settle_seconds():.0f} s after the interruption")
            sub = self.store.transition(sub.id, State.QUEUED, f"recovered: {why}; will upload again",
                                        next_attempt_at=None, flag=None)
            self.hooks.submission_changed(sub, "requeued")
            return
        self._defer(sub, "upload interrupted by a stop; waiting for fileX to show whether it arrived "
                         "before deciding to send it again")

    def _defer(self, sub: Submission, flag: str) -> None:
        fields: dict = {"flag": flag}
        if sub.next_attempt_at is None:  # kept across restarts: repeated crashes do not push it back
            fields["next_attempt_at"] = utcnow() + timedelta(seconds=self.settle_seconds())
        self.store.update(sub.id, **fields)
        with self._lock:
            self._unconfirmed.add(sub.id)

    def recheck_interrupted(self) -> None:
        """Each tracking cycle: decide the interrupted uploads recovery could not decide yet."""
        with self._lock:
            ids = sorted(self._unconfirmed)
        for sub_id in ids:
            if self._stopping.is_set():
                return
            sub = self.store.get(sub_id)
            if sub.state is not State.UPLOADING:
                with self._lock:
                    self._unconfirmed.discard(sub_id)
                continue
            self._recover_upload(sub)

    def _remote_evidence(self, route: RouteSettings, sub: Submission) -> tuple[str | None, str | None]:
        """(what shows fileX has this upload, its tracking id if known) or (None, None)."""
        location = f"{route.org}/{route.application}/in"
        probe = Submission(**{**sub.__dict__, "upload_location": location})
        if self.connections.has_api(route.credential):
            api = self.connections.api(route.credential)
            claimed = {s.tracking_id for s in self.store.list() if s.tracking_id and s.id != sub.id}
            for rec in api.tracking():
                if rec.trackingId in claimed:
                    continue
                received = (rec.status or "").lower() != "request received" or bool(rec.downstreamStatus)
                if received and (rec.trackingId == sub.tracking_id or matches(rec, probe)):
                    return f"tracking {rec.trackingId}", rec.trackingId
            if sub.transport == "rest" and sub.tracking_id:
                # Landed but not yet processed: still in ``in`` (if fileX lets us list it at all).
                try:
                    children = api.list_files(route.org, route.application, "in").children
                except PermanentError as exc:
                    log.debug("listing in/ for %s: %s", sub.file_name, exc)
                    children = []
                for entry in children:
                    if entry.is_file and entry.name == sub.file_name and entry.metadata.contentLength in (None, sub.size):
                        return f"in/{sub.file_name} present", None
        with self.connections.transport(route, sub.transport) as transport:
            found = transport.find_uploaded(sub.file_name)
            if found is not None and (found.size is None or found.size == sub.size):
                return f"{sub.transport} in/{sub.file_name}", None
        return None, None

    # -- one-shot ------------------------------------------------------------------------
    def submit_once(self, route: RouteSettings, path: Path, wait_final: bool = False,
                    timeout: float = 600.0) -> Submission:
        """``filex-agent submit``: claim a file (copied into the outbox spool) and upload it now."""
        self.recover()
        sub = self.submitter.claim(route, path)
        if sub is None:
            raise FilexError(f"{path} disappeared before it could be claimed")
        if sub.state is State.QUEUED:
            sub = self.submitter.upload(sub.id)
        return sub


def _cleanup_spool(route: RouteSettings) -> None:
    """Temporary files a crash left in the spool (private copies of hard-linked files)."""
    from filex_agent.submitter import spool_dir

    spool = spool_dir(route)
    if spool.is_dir():
        for d in spool.iterdir():
            if d.is_dir():
                cleanup_partials(d)


def _now_local():
    from datetime import datetime

    return datetime.now().astimezone()

