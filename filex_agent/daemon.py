"""The daemon: recovery, watcher, upload workers and scheduled tracking/feedback jobs.

Start-up order matters: the journal is reconciled (``recover``) before anything new is sent.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler

from filex_agent.config import Config, RouteSettings
from filex_agent.connections import Connections
from filex_agent.errors import FilexError
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
        self.store = store or open_store(config.journal_path)
        self.hooks = MultiHooks(LoggingHooks(), *([hooks] if hooks else []))
        self.connections = Connections(config, on_retry=self.hooks.retry)
        self.submitter = Submitter(config, self.store, self.connections, self.hooks)
        self.feedback = FeedbackCollector(config, self.store, self.connections, self.hooks)
        self.tracker = Tracker(config, self.store, self.connections, self.submitter, self.hooks,
                               on_final=self._final_seen)
        self.dispatch_interval = dispatch_interval
        self.executor = ThreadPoolExecutor(config.agent.workers, thread_name_prefix="upload")
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.watcher = None
        self._inflight: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._feedback_due: set[str] = set()
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

    def stop(self, grace: float | None = None) -> None:
        """Stop taking files; let uploads in flight finish within the grace period."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        grace = self.config.agent.shutdown_grace_seconds if grace is None else grace
        if self.watcher is not None:
            self.watcher.stop()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        with self._lock:
            pending = list(self._inflight.values())
        done = threading.Event()

        def _wait() -> None:
            for f in pending:
                try:
                    f.result()
                except Exception:  # noqa: BLE001 - already logged by the worker
                    pass
            done.set()

        threading.Thread(target=_wait, daemon=True).start()
        if not done.wait(grace):
            log.warning("shutdown grace of %.0f s over with uploads in flight; they are recovered at next start", grace)
        self.executor.shutdown(wait=False, cancel_futures=True)
        for conns in [*self._old_connections, self.connections]:
            conns.close()
        self.store.close()
        log.info("filex-agent stopped")

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
        while not stop.wait(1.0):
            pass
        self.stop()
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
        """Start an upload for every QUEUED submission that is due."""
        if self._stopping.is_set():
            return
        now = utcnow()
        for sub in self.store.list([State.QUEUED]):
            if sub.next_attempt_at is None or sub.next_attempt_at <= now:
                self._submit(sub.id)

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
            sub = self.submitter.upload(sub_id)
            if sub.state is State.SUBMITTED:
                self._feedback_due.add(sub.route)
        except Exception:  # noqa: BLE001
            log.exception("submission %s: upload worker failed", sub_id)
        finally:
            with self._lock:
                self._inflight.pop(sub_id, None)

    def _final_seen(self, route: str) -> None:
        self._feedback_due.add(route)

    def track_and_collect(self) -> None:
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

    def _recover_upload(self, sub: Submission) -> None:
        """An upload was cut off: submitted only if fileX has it, else queued again."""
        try:
            route = self.config.route(sub.route)
            evidence = self._remote_evidence(route, sub)
        except FilexError as exc:
            log.warning("submission %s: cannot check fileX during recovery (%s); will check again", sub.id, exc)
            self.store.update(sub.id, flag=f"upload interrupted; fileX could not be checked yet: {exc}")
            return  # stays UPLOADING; the next start (or operator) reconciles it, never re-sent blindly
        if evidence:
            sub = self.store.transition(sub.id, State.SUBMITTED, f"recovered: fileX has it ({evidence})",
                                        uploaded_at=utcnow(), upload_location=f"{route.org}/{route.application}/in")
            self.submitter.file_original(sub, "sent")
        else:
            self.store.transition(sub.id, State.QUEUED, "recovered: not received by fileX, will upload again",
                                  next_attempt_at=None)

    def _remote_evidence(self, route: RouteSettings, sub: Submission) -> str | None:
        location = f"{route.org}/{route.application}/in"
        probe = Submission(**{**sub.__dict__, "upload_location": location})
        if self.connections.has_api(route.credential):
            api = self.connections.api(route.credential)
            for rec in api.tracking():
                if rec.trackingId == sub.tracking_id or (
                        matches(rec, probe) and (rec.status or "").lower() != "request received"):
                    return f"tracking {rec.trackingId}"
        with self.connections.transport(route, sub.transport) as transport:
            found = transport.find_uploaded(sub.file_name)
            if found is not None and (found.size is None or found.size == sub.size):
                return f"{sub.transport} in/{sub.file_name}"
        return None

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


def _now_local():
    from datetime import datetime

    return datetime.now().astimezone()

