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
from filex_agent.connections import ConnectionLeases, Connections
from filex_agent.errors import FilexError
from filex_agent.feedback import FeedbackCollector
from filex_agent.filing_calendar import hold_for_window
from filex_agent.fsutil import cleanup_partials
from filex_agent.hooks import Hooks, LoggingHooks, MultiHooks
from filex_agent.leases import Heartbeat, Leadership, new_owner, node_name, owner_is_dead_here
from filex_agent.reconciler import Reconciler, decide_by, unconfirmed_flag
from filex_agent.store import FINAL_STATES, Outcome, State, StateConflict, Store, Submission, open_store, utcnow
from filex_agent.submitter import Submitter
from filex_agent.tracker import Tracker

log = logging.getLogger(__name__)
# Files claimed per journal write when many are ready at once: big enough that 100,000 files
# queue within a minute, small enough that the first of them starts uploading within ~0.1 s.
CLAIM_BATCH = 128


class Daemon:
    def __init__(self, config: Config, *, store: Store | None = None, hooks: Hooks | None = None,
                 dispatch_interval: float = 1.0, role: str = "run", exclusive: bool = False):
        self.config = config
        self.store = store or open_store(config.journal_path, journal=config.journal)
        self.hooks = MultiHooks(LoggingHooks(), *([hooks] if hooks else []))
        self.connections = Connections(config, on_retry=self.hooks.retry)
        self.node = node_name(config)
        self.owner = new_owner(config, role)
        # True while this process holds the SQLite journal's instance lock: then every other
        # `run` owner in the journal is a dead predecessor, whose leases need not be waited out.
        self.exclusive = exclusive
        self.submitter = Submitter(config, self.store, self.connections, self.hooks, self.owner)
        self.feedback = FeedbackCollector(config, self.store, self.connections, self.hooks)
        self.tracker = Tracker(config, self.store, self.connections, self.submitter, self.hooks)
        self.reconciler = Reconciler(config, self.store, self.connections, self.submitter, self.hooks, self.owner)
        # Singletons (tracking, feedback, audit sweep, alerts) run where this says, one agent at a
        # time; a journal only this process uses (SQLite) needs no election.
        self.leadership = Leadership(self.store, self.owner, self.node, config.journal.lease_seconds,
                                     info=self._node_info, always=exclusive or not self.store.shared,
                                     ) if role == "run" else None
        self.heartbeat = Heartbeat(self.store, self.owner, config.journal.lease_seconds,
                                   held=self._held, on_lost=self._leases_lost, leadership=self.leadership)
        self._last_rescue = 0.0
        self.dispatch_interval = dispatch_interval
        self.executor = ThreadPoolExecutor(config.agent.workers, thread_name_prefix="upload")
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.watcher = None
        self._inflight: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        # Set by the signal handler at once: no new file is taken or started from then on, even
        # while the main loop is still busy before it calls stop().
        self._intake_closed = threading.Event()
        self._conn_leases = ConnectionLeases()  # old Connections close when their last upload ends
        self._track_guard = OverrunGuard("the tracking cycle")
        self._dispatch_guard = OverrunGuard("the dispatch tick")
        self.started = False

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        from filex_agent.spool import check_spools
        from filex_agent.watcher import OutboxWatcher

        check_spools(self.config)  # a spool a producer replaced (link, not ours): refuse to start
        self.recover()
        if self.leadership is not None:
            try:  # now, not a third of a lease later: a lone agent tracks from its first cycle
                self.leadership.beat()
            except Exception as exc:  # noqa: BLE001 - the heartbeat tries again
                log.warning("joining the cluster failed (the heartbeat retries): %s", exc)
        self.heartbeat.start()
        self.watcher = OutboxWatcher(self.config.routes, self._on_candidate,
                                     rescan_interval=self.config.watcher.rescan_interval_seconds,
                                     on_ready_batch=self._on_candidates)
        self.watcher.start()
        t = self.config.tracking
        # max_instances=2 with jobs that skip themselves while their previous run is still going
        # (OverrunGuard): APScheduler's own limit would log a warning at every skipped tick.
        self.scheduler.add_job(self._dispatch_job, "interval", seconds=self.dispatch_interval, id="dispatch",
                               max_instances=2, coalesce=True, next_run_time=_now_local())
        self.scheduler.add_job(self.track_and_collect, "interval", seconds=t.poll_interval_seconds, id="track",
                               max_instances=2, coalesce=True, next_run_time=_now_local())
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
            log.warning("shutdown grace of %.0f s over with work in flight; it is decided from fileX's "
                        "evidence, never sent blindly again", grace)
            self._cut_off()
        self.heartbeat.stop()
        if self.leadership is not None:
            self.leadership.resign()
        self._conn_leases.close_retired()
        try:
            self.connections.close()
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
        unfinished = [st for st in State if st not in FINAL_STATES]
        retired = [r for r in self.config.routes if r.name not in new_names
                   and self.store.count(unfinished, r.name)]
        effective = config.model_copy(update={"routes": list(config.routes) + retired})
        if self.watcher is not None:
            # First: it raises (new outbox cannot be created) before anything has changed.
            self.watcher.set_routes(list(config.routes))
        new = Connections(effective, on_retry=self.hooks.retry)
        with self._conn_leases.lock:  # no upload can take the old set once this block ends
            old = self.connections
            self.config = effective
            self.connections = new
            for part in (self.submitter, self.tracker, self.feedback, self.reconciler):
                part.config = effective
                part.connections = new
        self._conn_leases.retire(old)  # closed when the uploads that started under it have finished
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
        if self._closed():
            return
        try:
            sub = self.submitter.claim(cand.route, Path(cand.path), cand.trigger)
        except Exception:  # noqa: BLE001 - keep the watcher alive; the file stays in the outbox
            log.exception("claiming %s failed", cand.path)
            return
        if sub is not None and sub.state is State.QUEUED:
            self._submit(sub.id, only_if_room=True)

    def close_intake(self) -> None:
        """Take no new file and start no upload from now on (a stop is coming; safe in a signal handler)."""
        self._intake_closed.set()

    def _closed(self) -> bool:
        return self._stopping.is_set() or self._intake_closed.is_set()

    def _on_candidates(self, cands: list) -> None:
        """A tick's ready files, claimed a batch per route (one journal write for each step of a
        batch, not one per file: 100,000 files queue in a minute, not in minutes)."""
        by_route: dict[str, list] = {}
        for cand in cands:
            by_route.setdefault(cand.route.name, []).append(cand)
        for group in by_route.values():
            for i in range(0, len(group), CLAIM_BATCH):
                if self._closed():
                    return
                chunk = group[i:i + CLAIM_BATCH]
                try:
                    subs = self.submitter.claim_many(chunk[0].route, [(Path(c.path), c.trigger) for c in chunk])
                except Exception:  # noqa: BLE001 - keep the watcher alive; the files stay in the outbox
                    log.exception("claiming %d file(s) of route %s failed", len(chunk), chunk[0].route.name)
                    continue
                for sub in subs:
                    if sub.state is State.QUEUED:
                        self._submit(sub.id, only_if_room=True)

    def dispatch(self) -> None:
        """Start uploads for QUEUED submissions that are due, a few per worker at a time.

        Only the ids that can start soon are read: with 100,000 files queued, reading every row
        every second cost most of a core.
        """
        if self._stopping.is_set():
            return
        if time.monotonic() - self._last_rescue >= self.config.journal.lease_seconds / 3:
            # Here rather than in the tracking cycle: a dead owner's uploads resume within seconds.
            self._last_rescue = time.monotonic()
            self.rescue_expired()
        self._refill()

    def _refill(self) -> None:
        """Hand due QUEUED submissions to the workers while there is room."""
        if self._closed():
            return
        with self._lock:
            room = 2 * self.config.agent.workers - len(self._inflight)
            busy = len(self._inflight)
        if room <= 0:
            return
        for sub_id in self.store.due(utcnow(), room + busy):
            self._submit(sub_id, only_if_room=True)

    def _submit(self, sub_id: int, only_if_room: bool = False) -> None:
        with self._lock:
            if sub_id in self._inflight or self._closed():
                return
            if only_if_room and len(self._inflight) >= 2 * self.config.agent.workers:
                # Workers busy: the journal has it QUEUED and the dispatch tick starts it when one
                # frees. Handing every claimed file to the executor kept a Future per file of a
                # 100,000-file backlog in memory.
                return
            try:
                fut = self.executor.submit(self._upload, sub_id)
            except RuntimeError:  # executor shut down
                return
            self._inflight[sub_id] = fut

    def _upload(self, sub_id: int) -> None:
        ran = False
        try:
            if hold_for_window(self.config, self.store, sub_id):
                return  # QUEUED until the route's submission window opens (filing_calendar)
            ran = True
            with self._conn_leases.lease(lambda: self.connections):
                self.submitter.upload(sub_id)
        except Exception:  # noqa: BLE001
            log.exception("submission %s: upload worker failed", sub_id)
        finally:
            with self._lock:
                self._inflight.pop(sub_id, None)
        if ran:
            # The next one now, not at the next dispatch tick: a batch of claims queues more
            # files than there are workers, and each would otherwise wait up to a tick.
            try:
                self._refill()
            except Exception:  # noqa: BLE001 - the dispatch tick does it anyway
                log.debug("refilling the upload queue failed", exc_info=True)

    def leads(self, singleton: str) -> bool:
        """Whether this process runs ``singleton`` now (leases.SINGLETONS)."""
        return self.leadership is not None and self.leadership.leads(singleton)

    def _node_info(self) -> dict:
        from filex_agent import __version__

        return {"pid": os.getpid(), "owner": self.owner, "version": __version__,
                "routes": [r.name for r in self.config.routes], "workers": self.config.agent.workers,
                "uploading": len(self._held())}

    def _dispatch_job(self) -> None:
        self._dispatch_guard.run(self.dispatch)

    def track_and_collect(self) -> None:
        """One tracking cycle, unless the previous one is still running (then skipped quietly)."""
        self._track_guard.run(self._lease_and_track)

    def _lease_and_track(self) -> None:
        with self._conn_leases.lease(lambda: self.connections):
            self._track_and_collect()

    def _track_and_collect(self) -> None:
        steps = [self.rescue_expired]
        if self.leads("tracking"):
            steps += [self._reconcile, self.tracker.poll]
        if self.leads("feedback"):
            steps.append(self.feedback.collect_all)
        for step in steps:
            if self._stopping.is_set():
                return
            try:
                step()
            except Exception:  # noqa: BLE001 - one failing step must not starve the others
                log.exception("%s failed", getattr(step, "__name__", step))

    def _reconcile(self) -> None:
        self.reconciler.run(stopping=self._stopping.is_set)

    # -- ownership -----------------------------------------------------------------------
    def _held(self) -> set[int]:
        with self.submitter._leased_lock:
            return set(self.submitter.leased)

    def _leases_lost(self, ids: set[int]) -> None:
        # Fencing makes the worker's next write fail; this only says why, early.
        log.error("lost the lease of submission(s) %s (the journal was unreachable or this process stalled "
                  "past journal.lease_seconds); their uploads are abandoned and decided from fileX's evidence",
                  ", ".join(map(str, sorted(ids))))

    def rescue_expired(self) -> None:
        """Uploads whose owner died or stalled: take them over and settle their open attempt."""
        for sub in self.store.expired_leases():
            if sub.id in self._held():
                continue  # our own, slow heartbeat: the worker is still at it
            self._guarded(sub, self._rescue, "its owner stopped renewing its lease")
        if not (self.store.shared and self.leads("tracking")):
            return
        # A claim whose agent died between its journal row and its rename (another machine);
        # by the leader only: two rescuers of one claim could each think the other's rename lost it.
        stale = self.store.now() - timedelta(seconds=2 * self.config.journal.lease_seconds)
        for sub in self.store.list([State.CLAIMING]):
            if sub.updated_at < stale:
                self._guarded(sub, self._recover_claim)

    def _rescue(self, sub: Submission, why: str, force: bool = False) -> None:
        sub = self.store.take_over(sub.id, self.owner, force=force)
        # SENT and UNCONFIRMED too: its owner died between recording the attempt's outcome and
        # the row's state (two writes); such an attempt may have landed, so it is never taken
        # for "nothing can have landed".
        open_ = [a for a in self.store.attempts(sub.id)
                 if a.outcome in (Outcome.PENDING, Outcome.SENT, Outcome.UNCONFIRMED)]
        att = open_[-1] if open_ else None
        if att is not None and att.may_have_landed:
            until = att.decide_by or decide_by(self.store, self.config)
            if att.outcome is not Outcome.UNCONFIRMED or att.decide_by is None:
                self.store.end_attempt(att.id, Outcome.UNCONFIRMED, f"interrupted: {why}", epoch=sub.epoch,
                                       decide_by=until)
            sub = self.store.transition(sub.id, State.UNCONFIRMED, f"interrupted after it may have reached "
                                        f"fileX ({why})", epoch=sub.epoch, owner=None, lease_until=None,
                                        flag=unconfirmed_flag(until))
            self.hooks.submission_changed(sub, "unconfirmed")
            return
        if att is not None:
            self.store.end_attempt(att.id, Outcome.NOT_SENT, f"interrupted before anything could reach fileX "
                                   f"({why})", epoch=sub.epoch)
        sub = self.store.transition(sub.id, State.QUEUED, f"interrupted before anything could reach fileX ({why}); "
                                    "will upload again", epoch=sub.epoch, owner=None, lease_until=None,
                                    next_attempt_at=None, flag=None, tracking_id=None)
        self.hooks.submission_changed(sub, "requeued")

    def _cut_off(self) -> None:
        """A stop past its grace: fence this process's uploads in flight (their late writes are
        refused) and record each as UNCONFIRMED if it may have landed, else QUEUED."""
        for sub_id in sorted(self._held()):
            try:
                self._rescue(self.store.get(sub_id), "the agent stopped past its shutdown grace", force=True)
            except Exception:  # noqa: BLE001 - the next start decides it from the journal anyway
                log.exception("submission %s: recording the cut-off upload failed", sub_id)

    def _guarded(self, sub: Submission, step, *args) -> None:
        """Run one row's recovery step; a row that cannot be recovered is flagged, never fatal."""
        try:
            step(sub, *args)
        except StateConflict as exc:
            log.info("submission %s: %s", sub.id, exc)
        except Exception as exc:  # noqa: BLE001
            log.exception("submission %s could not be recovered; skipped", sub.id)
            try:
                self.store.update(sub.id, flag=f"recovery failed ({type(exc).__name__}: {exc}); "
                                               "skipped, retried at the next start")
            except Exception:  # noqa: BLE001
                log.debug("flagging submission %s failed", sub.id, exc_info=True)

    # -- recovery ------------------------------------------------------------------------
    def recover(self) -> None:
        """Reconcile the journal with the disk before anything is sent: claims a crash cut off,
        uploads whose owner is gone, moves journaled but not done. One bad row is flagged and
        skipped; it never stops the agent."""
        for route in self.config.routes:
            try:
                cleanup_partials(route.folder("feedback", self.config.agent.data_dir))
                _cleanup_spool(route)
            except OSError as exc:
                log.error("route %s: cleaning up after a crash failed: %s", route.name, exc)
        for sub in self.store.list([State.CLAIMING]):
            # Not a live agent's claim in progress (a shared journal): those are its own.
            if not sub.owner or self._exclusive_over(sub.owner) or owner_is_dead_here(sub.owner, self.node):
                self._guarded(sub, self._recover_claim)
        for sub in self.store.list([State.UPLOADING]):
            if self._exclusive_over(sub.owner) or owner_is_dead_here(sub.owner, self.node):
                self._guarded(sub, self._rescue, "the agent that was uploading it is gone", True)
        self.rescue_expired()
        for sub in self.store.pending_moves():  # an index lookup, not a read of the history
            self._guarded(sub, self.submitter.finish_move)

    def _exclusive_over(self, owner: str | None) -> bool:
        """This process holds the journal alone, so ``owner``, a `run` before it, is dead."""
        return self.exclusive and (owner or "").endswith(":run")

    def _recover_claim(self, sub: Submission) -> None:
        src, dst = Path(sub.source_path), Path(sub.local_path)
        if dst != src and dst.exists():
            sub = self.store.transition(sub.id, State.QUEUED, "recovered: claim completed")
            self.submitter.validate(sub)
        else:
            # The rename never happened (or the file is gone): finish or close the claim now,
            # before the watcher starts.
            self.submitter.complete_claim(sub)

    # -- one-shot ------------------------------------------------------------------------
    def submit_once(self, route: RouteSettings, path: Path, wait_final: bool = False,
                    timeout: float = 600.0) -> Submission:
        """``filex-agent submit``: claim a file (copied into the outbox spool) and upload it now.

        Runs beside a live daemon on the same journal: it touches only its own submission (no
        recovery: that is the daemon's, and rows another process owns are never touched)."""
        sub = self.submitter.claim(route, path)
        if sub is None:
            raise FilexError(f"{path} disappeared before it could be claimed")
        if sub.state is State.QUEUED:
            self.heartbeat.start()
            try:
                sub = self.submitter.upload(sub.id)
            finally:
                self.heartbeat.stop()
        return sub


class OverrunGuard:
    """Runs a periodic job unless its previous run is still going: a slow tracking cycle over a
    backlog skips its next ticks instead of queueing behind itself. Says so once per hour at
    most (a cycle that overruns every time must not fill the log), and when it has caught up."""

    WARN_EVERY = 3600.0

    def __init__(self, what: str):
        self.what = what
        self._lock = threading.Lock()
        self._overrun = False
        self._warned_at: float | None = None
        self.skipped = 0

    def run(self, fn) -> bool:  # noqa: ANN001
        """Run ``fn`` now; False (without running it) if its previous run has not ended."""
        if not self._lock.acquire(blocking=False):
            self.skipped += 1
            if not self._overrun:
                self._overrun = True
                now = time.monotonic()
                quiet = self._warned_at is not None and now - self._warned_at < self.WARN_EVERY
                if not quiet:
                    self._warned_at = now
                log.log(logging.DEBUG if quiet else logging.WARNING,
                        "%s is taking longer than its interval; its next runs are skipped until it ends",
                        self.what)
            return False
        try:
            fn()
        finally:
            ended_overrun, self._overrun = self._overrun, False
            self._lock.release()
        if ended_overrun:
            log.debug("%s ended after overrunning its interval", self.what)
        return True


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

