"""`filex-agent run`: the daemon wired to its audit trail, metrics, notifications and systemd.

Signals: SIGTERM/SIGINT stop taking files and let uploads finish within the grace period
(exit 0; a second signal exits at once, the journal recovers the rest at the next start);
SIGHUP re-reads the config file and applies it (a bad file is logged and ignored).
All signal work happens on the main loop, never in the handler itself.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from datetime import datetime
from pathlib import Path
from types import FrameType

from filex_agent import sdnotify
from filex_agent.audit import AuditLog
from filex_agent.config import Config, NotifySettings, load_config
from filex_agent.errors import ConfigError, FilexError
from filex_agent.filing_calendar import CalendarWatch
from filex_agent.hooks import MultiHooks
from filex_agent.logging_setup import configure_logging, register_secret
from filex_agent.metrics import Metrics, parse_listen
from filex_agent.notify import Notifier, SmtpSettings
from filex_agent.observers import AuditHooks, MetricsHooks, NotifyHooks, ProblemChecks
from filex_agent.store import PENDING_STATES, State, SubmissionQuery, iter_submissions, open_store

log = logging.getLogger(__name__)

TICK_SECONDS = 1.0
STATUS_SECONDS = 5.0
CHECK_SECONDS = 60.0
# The main loop must have ticked this recently for the watchdog to be fed.
LOOP_STALL_SECONDS = 30.0


_SWEPT = tuple(str(st) for st in (*PENDING_STATES, State.HELD))  # states the audit sweep catches up


def build_notifier(settings: NotifySettings) -> Notifier:
    """A Notifier from [notify]; every resolved secret is registered for redaction first."""
    webhook = settings.webhook_url.resolve() if settings.webhook_url else None
    register_secret(webhook)
    smtp = None
    if settings.smtp_host:
        password = settings.smtp_password.resolve() if settings.smtp_password else None
        register_secret(password)
        smtp = SmtpSettings(host=settings.smtp_host, port=settings.smtp_port, username=settings.smtp_username,
                            password=password, from_addr=settings.smtp_from or "", to_addrs=list(settings.smtp_to),
                            starttls=settings.smtp_starttls, ca_file=settings.smtp_ca_file)
    return Notifier(webhook_url=webhook, smtp=smtp, realert_seconds=settings.realert_seconds)


def ready_window(cfg: Config) -> float:
    """A tracking poll older than this means the agent is not ready (fileX unreachable...)."""
    return 3 * cfg.tracking.poll_interval_seconds + 60.0


class Service:
    def __init__(self, cfg: Config, config_path: Path | None):
        from filex_agent.daemon import Daemon

        self.cfg = cfg
        self.config_path = config_path
        self.notifier = build_notifier(cfg.notify)  # first: a missing secret stops us before anything opens
        self.store = open_store(cfg.journal_path, journal=cfg.journal)
        try:
            exclusive = self.store.lock_instance(f"pid {os.getpid()} on {socket.gethostname()}, "
                                                 f"started {datetime.now().astimezone():%Y-%m-%d %H:%M:%S %Z}")
        except BaseException:
            self.store.close()
            raise
        self.audit = AuditLog(cfg.audit_path)
        self.metrics = Metrics()
        self.audit_hooks = AuditHooks(self.audit, self.store)
        self.metrics_hooks = MetricsHooks(self.metrics, self.store)
        self.notify_hooks = NotifyHooks(self.notifier, self.store, cfg)
        self.checks = ProblemChecks(cfg, self.store, self.notifier)
        self.calendar = CalendarWatch(cfg, self.store, self.notifier, self.metrics, on_change=self._audit_occurrence)
        self.daemon = Daemon(cfg, store=self.store, exclusive=exclusive, hooks=MultiHooks(
            self.audit_hooks, self.metrics_hooks, self.notify_hooks, self.checks))
        self.watchdog = sdnotify.Watchdog()
        self.web = None  # the status page (filex_agent/web), when [web] enables it
        # Its secrets are resolved now: a missing one stops the start (exit 2), like [notify]'s.
        self._web_auth = _web_authenticator(cfg) if cfg.web.enabled else None
        self._wake = threading.Event()
        self._stop_requested = False
        self._reload_requested = False
        self._signals = 0
        self._last_tick = time.monotonic()
        self._last_status: str | None = None

    # -- probes ------------------------------------------------------------------------------
    def alive(self) -> bool:
        """For the watchdog: the daemon is healthy and the main loop is turning."""
        return self.daemon.healthy() and time.monotonic() - self._last_tick < LOOP_STALL_SECONDS

    def ready(self) -> bool:
        last = self.metrics_hooks.last_poll
        return bool(self.daemon.started and last is not None and time.time() - last < ready_window(self.cfg))

    def status_line(self) -> str:
        # One COUNT per state (every few seconds): a 100,000-file backlog is not read row by row.
        counts = {s: sum(self.store.count([s]).values())
                  for s in (State.QUEUED, State.UPLOADING, State.UNCONFIRMED, State.SUBMITTED, State.HELD)}
        parts = [f"{counts[State.QUEUED]} queued", f"{counts[State.UPLOADING]} uploading",
                 f"{counts[State.SUBMITTED]} submitted"]
        if counts[State.UNCONFIRMED]:
            parts.append(f"{counts[State.UNCONFIRMED]} unconfirmed (waiting for fileX's evidence)")
        if counts[State.HELD]:
            parts.append(f"{counts[State.HELD]} held")
        last = self.metrics_hooks.last_poll
        parts.append("last poll " + (datetime.fromtimestamp(last).strftime("%H:%M:%S") if last else "never")
                     + (" (failing)" if self.metrics_hooks.last_poll_failed else ""))
        return ", ".join(parts)

    def start_web(self) -> str | None:
        """Start the status page if [web] enables it (once); its URL, or None. A port in use is
        logged, not fatal: filings matter more than the page."""
        if not self.cfg.web.enabled:
            return None
        if self.web is None:
            from filex_agent.web.app import Sources
            from filex_agent.web.server import WebServer

            web = WebServer(self.cfg.web, Sources(self.store, lambda: self.cfg,
                                                  last_poll=lambda: self.metrics_hooks.last_poll,
                                                  active_problems=lambda: self.checks.active),
                            auth=self._web_auth)
            try:
                web.start()
            except OSError as exc:
                log.error("status page on %s not started: %s", self.cfg.web.listen, exc)
                return None
            self.web = web
        return self.web.url

    # -- signals -----------------------------------------------------------------------------
    def _on_stop(self, signum: int, frame: FrameType | None) -> None:  # noqa: ARG002
        self._signals += 1
        if self._signals > 1:
            # os.write: no logging (locks) inside a signal handler that interrupted anything.
            os.write(2, b"filex-agent: second signal, exiting now; the journal recovers the rest at next start\n")
            os._exit(1)
        self._stop_requested = True
        self.daemon.close_intake()  # now, not when the main loop gets round to stop()
        self._wake.set()

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:  # noqa: ARG002
        self._reload_requested = True
        self._wake.set()

    # -- lifecycle ---------------------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        if self.cfg.metrics.enabled:
            try:
                host, port = parse_listen(self.cfg.metrics.listen)
                self.metrics.serve(host, port, health=self.daemon.healthy, ready=self.ready)
            except (OSError, ValueError) as exc:
                # Filings matter more than metrics: keep running, loudly.
                log.error("metrics server on %s not started: %s", self.cfg.metrics.listen, exc)
        self.start_web()
        try:
            self.daemon.start()
        except ConfigError as exc:  # e.g. a spool a producer replaced: the operator must look
            log.error("start-up refused: %s", exc)
            self._shutdown()
            return 2
        except Exception:
            log.exception("start-up failed")
            self._shutdown()
            return 1
        self._audit_event("agent.started", routes=[r.name for r in self.cfg.routes], pid=os.getpid())
        self._guard(self.notify_hooks.resume)
        self._sweep()
        self.metrics_hooks.refresh(r.name for r in self.cfg.routes)
        self._guard(self.calendar.run)
        sdnotify.ready(self.status_line())
        self.watchdog.start(self.alive)
        last_status = last_check = time.monotonic()
        while not self._stop_requested:
            self._wake.wait(TICK_SECONDS)
            self._wake.clear()
            self._last_tick = now = time.monotonic()
            if self._stop_requested:
                break
            if self._reload_requested:
                self._reload_requested = False
                self.reload()
            self._guard(self.notify_hooks.flush_due)
            self._guard(self.metrics_hooks.flush)
            if now - last_status >= STATUS_SECONDS:
                last_status = now
                self._guard(self._status)
            if now - last_check >= CHECK_SECONDS:
                last_check = now
                self._guard(self.periodic)
        log.info("shutting down")
        sdnotify.stopping()
        if not self._shutdown():
            # An upload stuck past the grace would keep the interpreter alive (executor threads
            # are joined at exit) until its read timeout: leave now; recovery has the journal.
            logging.shutdown()
            os._exit(0)
        return 0

    def periodic(self) -> None:
        """Every minute: problem checks, filing calendar, token counters, queue gauges, audit catch-up."""
        if self.daemon.leads("alerts"):  # one agent of a cluster alerts and keeps the calendar, not each
            self.checks.run()
            self._guard(self.calendar.run)
        self.metrics_hooks.poll_token_refreshes(self.daemon.connections)
        self.metrics_hooks.refresh(r.name for r in self.daemon.config.routes)
        self._sweep()

    def _sweep(self) -> None:
        # Journal events no hook announced (recovery, upload started, tracking status changes);
        # in a cluster the leader's chain records them (each node's hooks record its own work).
        if not self.daemon.leads("audit-sweep"):
            return
        # By pages: a 100,000-file backlog read whole every minute set the daemon's peak memory.
        for sub in iter_submissions(self.store, SubmissionQuery(states=_SWEPT)):
            self.audit_hooks.catch_up(sub.id)

    def _status(self) -> None:
        line = self.status_line()
        if line != self._last_status:
            self._last_status = line
            sdnotify.status(line)

    def _guard(self, fn) -> None:  # noqa: ANN001
        try:
            fn()
        except Exception:  # noqa: BLE001 - housekeeping must not stop the service
            log.exception("%s failed", getattr(fn, "__name__", fn))

    def _audit_occurrence(self, occ, previous: str | None) -> None:  # noqa: ANN001 - an Occurrence
        self._audit_event("calendar.occurrence", expectation=occ.expectation, period=occ.label,
                          deadline=occ.deadline.isoformat(), route=occ.route, state=occ.state, previous=previous,
                          on_time=occ.on_time, submission_id=occ.submission_id, verdict=occ.verdict)

    def _audit_event(self, event: str, **fields: object) -> None:
        try:
            self.audit.append(event, **fields)
        except Exception:  # noqa: BLE001
            log.exception("audit line %s not written", event)

    def _shutdown(self) -> bool:
        """False when uploads were cut off at the end of the grace (the journal has them)."""
        self.watchdog.stop()
        if self.web is not None:
            self.web.stop()  # before the journal closes
        self._guard(lambda: self.notify_hooks.flush_due(force=True))
        clean = self.daemon.stop()  # also closes the journal
        self._audit_event("agent.stopped", pid=os.getpid(), clean=bool(clean))
        self.metrics.stop()
        self.notifier.stop(timeout=10)
        self.audit.close()
        return clean is not False

    # -- reload ------------------------------------------------------------------------------
    def reload(self) -> bool:
        """Apply the config file again; False (old config kept) if it is invalid or cannot apply."""
        if self.config_path is None:
            log.warning("SIGHUP: no config file to reload (sandbox run); ignored")
            return False
        sdnotify.reloading()
        try:
            return self._reload()
        finally:
            sdnotify.ready(self.status_line())

    def _reload(self) -> bool:
        old = self.cfg
        try:
            new = load_config(self.config_path)
        except FilexError as exc:
            log.error("reload refused, the running configuration is kept: %s", exc)
            return False
        if new.agent.data_dir != old.agent.data_dir or new.audit_path != old.audit_path:
            log.error("reload refused: agent.data_dir or audit.path changed; restart the service to apply it")
            return False
        notifier = None
        if new.notify != old.notify:
            try:
                notifier = build_notifier(new.notify)
            except (FilexError, ValueError) as exc:
                log.error("reload refused, the running configuration is kept: [notify]: %s", exc)
                return False
        reload = getattr(self.daemon, "reload", None)
        if reload is None:
            log.error("reload refused: this build cannot reload routes; restart the service to apply it")
            if notifier is not None:
                notifier.stop()
            return False
        try:
            reload(new)
        except (FilexError, OSError) as exc:  # e.g. a new outbox that cannot be created
            log.error("reload failed, the running configuration is kept: %s", exc)
            if notifier is not None:
                notifier.stop()
            return False
        self.cfg = new
        self.notify_hooks.config = new
        self.checks.config = self.calendar.config = new
        if notifier is not None:
            old_notifier, self.notifier = self.notifier, notifier
            self.notify_hooks.notifier = self.checks.notifier = self.calendar.notifier = notifier
            old_notifier.stop(timeout=5)
        if (new.agent.log_level, new.agent.log_format) != (old.agent.log_level, old.agent.log_format):
            _configure_logging(new)
        if new.metrics != old.metrics:
            log.warning("[metrics] changed: it applies at the next restart")
        if new.web != old.web:
            log.warning("[web] changed: it applies at the next restart")
        self.metrics_hooks.refresh(r.name for r in new.routes)
        added = sorted({r.name for r in new.routes} - {r.name for r in old.routes})
        removed = sorted({r.name for r in old.routes} - {r.name for r in new.routes})
        self._audit_event("agent.reloaded", routes=[r.name for r in new.routes], added=added, removed=removed)
        log.info("configuration reloaded: %d route(s)%s%s", len(new.routes),
                 f", added {', '.join(added)}" if added else "", f", removed {', '.join(removed)}" if removed else "")
        return True


def prepare_service(cfg: Config, config_path: Path | None) -> Service:
    _configure_logging(cfg)
    return Service(cfg, config_path)


def run_service(cfg: Config, config_path: Path | None) -> int:
    """What `filex-agent run` does; returns the exit code."""
    return prepare_service(cfg, config_path).run()


def _web_authenticator(cfg: Config):  # noqa: ANN202
    from filex_agent.web.server import authenticator

    return authenticator(cfg.web)


def _configure_logging(cfg: Config) -> None:
    configure_logging(cfg.agent.log_level, cfg.agent.log_format)
