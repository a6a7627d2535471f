"""The pipeline's observers: audit trail, metrics, notifications and periodic problem checks.

Each is a ``Hooks`` the daemon calls after a journal change (through ``MultiHooks``, which
logs and swallows their errors: an observer never breaks a filing).

``AuditHooks`` mirrors the journal into the audit log *event by event*: on every call it
appends each journal event of that submission not yet in the audit file (numbered ``seq``,
1-based, in journal order). The audit file itself is the index of what was written, re-read
incrementally before each catch-up, so a restart, a crash between journal and audit, or an
event written by another process (``filex-agent submit``/``release``) never loses or doubles
a line.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from filex_agent.audit import AuditLog
from filex_agent.config import Config
from filex_agent.filing_calendar import WINDOW_REASON
from filex_agent.hooks import Hooks
from filex_agent.metrics import Metrics
from filex_agent.notify import Notification, Notifier
from filex_agent.store import (FINAL_STATES, PENDING_STATES, State, Store, Submission, SubmissionQuery,
                               iter_submissions, utcnow)

log = logging.getLogger(__name__)

# -- audit -------------------------------------------------------------------------------------

STATE_EVENT = "submission.state"
FEEDBACK_EVENT = "submission.feedback"
FLAG_EVENT = "submission.flagged"
# AuditLog writes keys in insertion order, compact: these match the lines AuditHooks writes.
_STATE_RE = re.compile(rb'"event":"submission\.state","submission_id":(\d+),"seq":(\d+)')
_FEEDBACK_RE = re.compile(rb'"event":"submission\.feedback","submission_id":(\d+),"feedback_id":(\d+)')


class _AuditIndex:
    """What the audit file already holds: last journal ``seq`` and feedback ids per submission.

    Kept in a side file (``<audit>.index``, SQLite) with the offset of the audit file it covers,
    so a start reads only what was appended since, not years of lines; every process appending
    to the audit file (daemon, CLI) shares it. The audit file stays the truth: the side file is
    checked against the bytes just before its offset and rebuilt from the start when they differ
    (a restored or replaced audit file) or when it cannot be read. Losing its last writes (a
    crash) only means re-reading those lines.
    """

    _TAIL = 64  # bytes before the offset that must still be there, unchanged

    def __init__(self, path: Path):
        self.path = path
        side = path.with_name(path.name + ".index")
        try:
            self._db = self._open(side)
        except sqlite3.Error as exc:
            log.warning("audit index %s unusable (%s); rebuilding it", side, exc)
            try:
                side.unlink(missing_ok=True)
                self._db = self._open(side)
            except (OSError, sqlite3.Error) as exc2:  # e.g. a read-only folder: memory only
                log.warning("audit index %s cannot be written (%s); kept in memory", side, exc2)
                self._db = self._open(":memory:")

    @staticmethod
    def _open(where: Path | str) -> sqlite3.Connection:
        db = sqlite3.connect(where, check_same_thread=False, isolation_level=None, timeout=30)
        if where != ":memory:":
            db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # rebuildable from the audit file: no fsync per line
        db.executescript("""
            CREATE TABLE IF NOT EXISTS seq (submission_id INTEGER PRIMARY KEY, seq INTEGER NOT NULL);
            CREATE TABLE IF NOT EXISTS feedback (feedback_id INTEGER PRIMARY KEY);
            CREATE TABLE IF NOT EXISTS mark (one INTEGER PRIMARY KEY CHECK (one = 1), offset INTEGER NOT NULL,
                                             tail BLOB NOT NULL);
        """)
        return db

    def seq_of(self, sub_id: int) -> int:
        row = self._db.execute("SELECT seq FROM seq WHERE submission_id = ?", (sub_id,)).fetchone()
        return row[0] if row else 0

    def has_feedback(self, feedback_id: int) -> bool:
        return self._db.execute("SELECT 1 FROM feedback WHERE feedback_id = ?", (feedback_id,)).fetchone() is not None

    def refresh(self) -> None:
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            row = self._db.execute("SELECT offset, tail FROM mark").fetchone()
            offset = row[0] if row else 0
            if offset and (offset > size or os.pread(f.fileno(), len(row[1]), offset - len(row[1])) != row[1]):
                log.warning("audit file %s is not the one its index was built from; re-reading it whole", self.path)
                offset = 0
            if offset == 0:  # from the start: nothing the index holds is known to be in this file
                self._db.executescript("BEGIN IMMEDIATE; DELETE FROM seq; DELETE FROM feedback; DELETE FROM mark; "
                                       "COMMIT;")
            if offset == size:
                return
            seqs: dict[int, int] = {}
            feedback: set[int] = set()
            f.seek(offset)
            for line in f:  # streamed: the file grows for years, never read whole
                if not line.endswith(b"\n"):
                    break  # a line being written (or a torn one): read again next time
                offset += len(line)
                m = _STATE_RE.search(line)
                if m:
                    sub_id, seq = int(m.group(1)), int(m.group(2))
                    if seq > seqs.get(sub_id, 0):
                        seqs[sub_id] = seq
                    continue
                m = _FEEDBACK_RE.search(line)
                if m:
                    feedback.add(int(m.group(2)))
            tail = os.pread(f.fileno(), min(self._TAIL, offset), offset - min(self._TAIL, offset))
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany("INSERT INTO seq (submission_id, seq) VALUES (?, ?) ON CONFLICT (submission_id) "
                                 "DO UPDATE SET seq = MAX(seq, excluded.seq)", list(seqs.items()))
            self._db.executemany("INSERT OR IGNORE INTO feedback (feedback_id) VALUES (?)", [(i,) for i in feedback])
            # Never back: another process may have read further meanwhile.
            self._db.execute("INSERT INTO mark (one, offset, tail) VALUES (1, ?, ?) ON CONFLICT (one) DO UPDATE "
                             "SET offset = excluded.offset, tail = excluded.tail WHERE excluded.offset > offset",
                             (offset, tail))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._db.close()


def _snapshot(sub: Submission) -> dict[str, Any]:
    """The submission as the journal has it now (the event's own fields come separately)."""
    return {
        "file": sub.file_name, "size": sub.size, "sha256": sub.sha256, "route": sub.route, "org": sub.org,
        "application": sub.application, "transport": sub.transport, "tracking_id": sub.tracking_id,
        "current_state": sub.state.value, "reason": sub.reason, "flag": sub.flag, "local_path": sub.local_path,
        "remote_status": sub.remote_status, "downstream_status": sub.downstream_status,
    }


class AuditHooks(Hooks):
    """One audit line per journal event of every submission, plus one per feedback file filed."""

    def __init__(self, audit: AuditLog, store: Store):
        self.audit = audit
        self.store = store
        self._lock = threading.Lock()
        self._index = _AuditIndex(audit.path)
        started = time.monotonic()
        self._index.refresh()
        log.debug("audit index of %s read in %.2fs", audit.path, time.monotonic() - started)

    def submission_changed(self, sub: Submission, event: str) -> None:
        self.catch_up(sub.id, flagged=event == "flagged")

    def submissions_changed(self, subs: list[Submission], event: str) -> None:
        self.catch_up_many([s.id for s in subs], flagged=event == "flagged", known={s.id: s for s in subs})

    def catch_up(self, sub_id: int, flagged: bool = False) -> int:
        """Append what the journal has for ``sub_id`` and the audit file lacks; returns lines written."""
        return self.catch_up_many([sub_id], flagged)

    def catch_up_many(self, sub_ids: list[int], flagged: bool = False,
                      known: dict[int, Submission] | None = None) -> int:
        """``catch_up`` of several submissions, their lines in one write and one fsync. ``known``:
        rows just returned by the journal's write (not read again)."""
        with self._lock:
            self._index.refresh()
            events = self.store.events_many(sub_ids)
            lines: list[tuple[str, dict[str, Any]]] = []
            for sub_id in sub_ids:
                sub = (known or {}).get(sub_id) or self.store.get(sub_id)
                lines.extend(self._missing(sub, events[sub_id], flagged))
            if not lines:
                return 0
            _, ticket = self.audit.write_many(lines)
            self._index.refresh()  # the lines just written (and any other writer's): read from the file
        # Durable before returning, but outside the lock: threads catching up meanwhile share the fsync.
        self.audit.wait(ticket)
        return len(lines)

    def _missing(self, sub: Submission, events: list, flagged: bool) -> list[tuple[str, dict[str, Any]]]:
        sub_id = sub.id
        # Feedback exists only for what reached fileX: a file just claimed has none to look up.
        reached = sub.uploaded_at is not None or sub.tracking_id is not None or sub.state not in _NOT_SENT
        feedback = self.store.feedback_for(sub_id) if reached else []
        paths = [f.local_path for f in feedback if f.local_path]
        snap = _snapshot(sub)
        out: list[tuple[str, dict[str, Any]]] = []
        done = self._index.seq_of(sub_id)
        for seq, ev in enumerate(events[done:], start=done + 1):
            outcome = ev.state if ev.state in _FINAL_NAMES else None
            out.append((STATE_EVENT, dict(submission_id=sub_id, seq=seq, at=ev.at.isoformat(), state=ev.state,
                                          detail=ev.detail, outcome=outcome, **snap, feedback=paths)))
        for f in feedback:
            if not f.local_path or self._index.has_feedback(f.id):
                continue
            out.append((FEEDBACK_EVENT, dict(submission_id=sub_id, feedback_id=f.id, remote_name=f.remote_name,
                                             feedback_file=f.local_path, **snap, feedback=paths)))
        if flagged and sub.flag:
            out.append((FLAG_EVENT, dict(submission_id=sub_id, **snap, feedback=paths)))
        return out


_NOT_SENT = frozenset({State.CLAIMING, State.QUEUED, State.HELD})
_FINAL_NAMES = frozenset(s.value for s in FINAL_STATES)


# -- metrics -----------------------------------------------------------------------------------

_OUTCOME = {"uploaded": "submitted", "ACCEPTED": "accepted", "REJECTED": "rejected",
            "PARTIALLY_REJECTED": "partially_rejected", "FAILED": "failed", "HELD": "held"}
WAITING_STATES = (State.CLAIMING, State.QUEUED)


def operation_label(op: str) -> str:
    """A low-cardinality label for a retried operation ("fileX list 0001/app1/out" → "list")."""
    o = op.lower()
    for needle, label in (("s3 transfer tokens", "s3_tokens"), ("token", "token"), ("tracking", "tracking"),
                          ("upload", "upload"), ("download", "download"), ("list", "list")):
        if needle in o:
            return label
    return "other"


QUEUE_DEPTH_SECONDS = 1.0


class MetricsHooks(Hooks):
    def __init__(self, metrics: Metrics, store: Store, clock: Callable[[], float] = time.time):
        self.metrics = metrics
        self.store = store
        self._clock = clock
        self._lock = threading.Lock()
        self._routes: set[str] = set()
        self._counted_at: dict[str, float] = {}  # clock time of each route's last queue count
        self._dirty: set[str] = set()  # routes with events since that count
        self._token_counts: dict[tuple[str, int], int] = {}
        self.last_poll: float | None = None  # unix time of the last tracking cycle that succeeded
        self.last_poll_failed: bool = False

    def submission_changed(self, sub: Submission, event: str) -> None:
        outcome = _OUTCOME.get(event)
        if outcome:
            self.metrics.submissions_total.labels(sub.route, sub.transport, outcome).inc()
        if event == "uploaded" and sub.uploaded_at is not None:
            if sub.upload_started_at is not None:
                self.metrics.upload_seconds.labels(sub.route, sub.transport).observe(
                    max(0.0, (sub.uploaded_at - sub.upload_started_at).total_seconds()))
            self.metrics.drop_to_submitted_seconds.labels(sub.route).observe(
                max(0.0, (sub.uploaded_at - sub.created_at).total_seconds()))
        self._queue_depth(sub.route)

    def bytes_sent(self, route: str, transport: str, n: int) -> None:
        if n > 0:
            self.metrics.bytes_sent_total.labels(route, transport).inc(n)

    def retry(self, operation: str) -> None:
        self.metrics.retries_total.labels(operation_label(operation)).inc()

    def tracking_polled(self, ok: bool) -> None:
        self.last_poll_failed = not ok
        if ok:
            self.last_poll = self._clock()
            self.metrics.last_tracking_poll_success.set(self.last_poll)

    def _queue_depth(self, route: str) -> None:
        # Counting on every journal event made a backlog of n files cost n² (measured: a
        # 100,000-file backlog queued at ~10 files/s): one count per route per
        # QUEUE_DEPTH_SECONDS; flush(), each service tick, catches up with the events skipped.
        now = self._clock()
        with self._lock:
            self._routes.add(route)
            due = now - self._counted_at.get(route, float("-inf")) >= QUEUE_DEPTH_SECONDS
            if due:
                self._counted_at[route] = now
                self._dirty.discard(route)
            else:
                self._dirty.add(route)
        if due:
            self.metrics.queue_depth.labels(route).set(self.store.count(WAITING_STATES, route).get(route, 0))

    def flush(self) -> None:
        """Queue depth of the routes whose events were not counted yet (the throttle above)."""
        with self._lock:
            dirty = sorted(self._dirty)
        for route in dirty:
            self._queue_depth(route)

    def refresh(self, routes: Iterable[str]) -> None:
        """Queue depth of every configured route (0 included); routes gone since are removed."""
        routes = set(routes)
        counts = {r: 0 for r in routes}
        counts.update(self.store.count(WAITING_STATES))
        with self._lock:
            gone = self._routes - set(counts)
            self._routes = set(counts)
        for r in gone:
            try:
                self.metrics.queue_depth.remove(r)
            except KeyError:
                pass
        for r, n in counts.items():
            self.metrics.queue_depth.labels(r).set(n)

    def poll_token_refreshes(self, connections: Any) -> None:
        """Count new FIP tokens and S3 transfer tokens since the last poll.

        The providers only keep running totals (``FipTokenProvider.refreshes``,
        ``S3TokenCache.fetch_count``); keyed by object so a reload that rebuilds them starts over.
        """
        for kind, provider, count in connections.token_counts():
            key = (kind, id(provider))
            last = self._token_counts.get(key, 0)
            if count > last:
                self.metrics.token_refreshes_total.labels(kind).inc(count - last)
            self._token_counts[key] = count


# -- notifications -----------------------------------------------------------------------------

_FINAL_TEXT = {
    "REJECTED": "FINRA rejected {file}: correct it and resubmit the whole file.",
    "PARTIALLY_REJECTED": "FINRA partially rejected {file}: submit a new file with only the corrected data.",
}


def feedback_wait_seconds(config: Config) -> float:
    """How long a REJECTED alert waits for its feedback file before it goes out without it.

    The daemon collects feedback right after the tracking poll that saw the final status, so
    feedback normally arrives within one cycle; two cycles (at least a minute) cover a slow
    listing or a feedback file FINRA writes a little after the status.
    """
    return max(60.0, 2 * config.tracking.poll_interval_seconds)


class NotifyHooks(Hooks):
    """REJECTED / PARTIALLY_REJECTED / FAILED alerts, one per submission, naming the feedback.

    A REJECTED alert is sent when the first feedback file of the submission is filed, or after
    ``feedback_wait_seconds`` without one (``flush_due``, called every few seconds by the
    service), so the alert says where the feedback is whenever FINRA provides it promptly and
    is never held back for long when it does not.

    The wait survives a restart: each alert is journaled as sent (``Store.mark_alerted``) just
    before it goes to the notifier, and ``resume()`` at start takes up every REJECTED row whose
    alert was not, so an alert is neither lost by a kill while it waits nor sent twice.
    """

    def __init__(self, notifier: Notifier, store: Store, config: Config,
                 clock: Callable[[], float] = time.monotonic, feedback_wait: float | None = None):
        self.notifier = notifier
        self.store = store
        self.config = config
        self._clock = clock
        self._feedback_wait = feedback_wait
        self._lock = threading.Lock()
        self._pending: dict[int, float] = {}  # submission id -> deadline

    @property
    def feedback_wait(self) -> float:
        return self._feedback_wait if self._feedback_wait is not None else feedback_wait_seconds(self.config)

    def submission_changed(self, sub: Submission, event: str) -> None:
        if event == "FAILED":
            self._send(sub)
        elif event in ("REJECTED", "PARTIALLY_REJECTED"):
            if any(f.local_path for f in self.store.feedback_for(sub.id)):
                self._send(sub)
            else:
                with self._lock:
                    self._pending[sub.id] = self._clock() + self.feedback_wait
        elif event == "feedback":
            with self._lock:
                due = self._pending.pop(sub.id, None) is not None
            if due:
                self._send(self.store.get(sub.id))

    def resume(self) -> int:
        """At start: the REJECTED / PARTIALLY_REJECTED alerts a stop or crash left waiting, from the
        journal. Sent now if their feedback is filed, else they wait out the rest of their time
        (from the final status), and at least one tracking poll for the feedback cycle to run."""
        n = 0
        now = utcnow()
        for sub in self.store.unalerted([State.REJECTED, State.PARTIALLY_REJECTED]):
            if any(f.local_path for f in self.store.feedback_for(sub.id)):
                self._send(sub)
            else:
                waited = (now - sub.final_at).total_seconds() if sub.final_at else 0.0
                left = max(self.feedback_wait - waited, self.config.tracking.poll_interval_seconds)
                with self._lock:
                    self._pending.setdefault(sub.id, self._clock() + left)
            n += 1
        if n:
            log.info("%d REJECTED alert(s) taken up from the journal", n)
        return n

    def flush_due(self, force: bool = False) -> int:
        """Send the REJECTED alerts whose feedback did not come in time (all with ``force``,
        at shutdown: an alert is never left unsent); returns how many."""
        now = self._clock()
        with self._lock:
            due = [i for i, deadline in self._pending.items() if force or deadline <= now]
            for i in due:
                del self._pending[i]
        for i in due:
            self._send(self.store.get(i))
        return len(due)

    def pending(self) -> list[int]:
        with self._lock:
            return sorted(self._pending)

    def _feedback_dir(self, sub: Submission) -> Path | None:
        try:
            return self.config.route(sub.route).folder("feedback", self.config.agent.data_dir)
        except Exception:  # noqa: BLE001 - route removed by a reload
            return None

    def _send(self, sub: Submission) -> None:
        kind = sub.state.value
        if not self.store.mark_alerted(sub.id, kind):
            return  # sent already (before a restart, or by a concurrent caller)
        feedback = [f.local_path for f in self.store.feedback_for(sub.id) if f.local_path]
        where = f"org {sub.org}, application {sub.application}, route {sub.route}, via {sub.transport}"
        if kind == "FAILED":
            reason_file = f"{sub.local_path}.reason.txt"
            text = (f"{sub.file_name} was not filed with FINRA ({where}).\n"
                    f"Reason: {sub.reason or 'unknown'}\n"
                    f"The file is at {sub.local_path}"
                    + (f" with the reason beside it in {reason_file}" if os.path.exists(reason_file) else "")
                    + ".\nNothing was uploaded; fix the problem and drop the file into the outbox again.")
            subject = f"{sub.file_name} failed: not filed ({sub.route})"
        else:
            text = _FINAL_TEXT[kind].format(file=sub.file_name) + f"\n{where}; tracking id {sub.tracking_id or '-'}."
            text += f"\nThe original is at {sub.local_path}."
            if not feedback:
                d = self._feedback_dir(sub)
                text += ("\nNo feedback file from FINRA yet; it will be filed in "
                         f"{d if d else 'the route feedback folder'} when it arrives "
                         f"(`filex-agent status` shows it).")
            subject = f"{sub.file_name} {kind.lower().replace('_', ' ')} by FINRA ({sub.route})"
        self.notifier.notify(Notification(kind=kind, subject=subject, text=text, submission_id=sub.id,
                                          file=sub.file_name, route=sub.route, feedback=feedback),
                             key=f"{kind}:{sub.id}")


# -- periodic problem checks -------------------------------------------------------------------

class ProblemChecks(Hooks):
    """STUCK (no final status after ``tracking.final_timeout_hours``) and ROUTE_DOWN (a route
    that could not submit for ``notify.route_down_minutes``), checked by ``run()`` every minute.

    An ongoing problem is notified on every run; the Notifier re-sends the same key only after
    ``realert_seconds``, and ``resolve()`` is called when the problem clears, so its next
    occurrence alerts at once. Also a ``Hooks``: it remembers each route's last successful upload.
    """

    def __init__(self, config: Config, store: Store, notifier: Notifier,
                 clock: Callable[[], datetime] = utcnow):
        self.config = config
        self.store = store
        self.notifier = notifier
        self._clock = clock
        self._lock = threading.Lock()
        self._last_upload: dict[str, datetime] = {}
        self._active: set[str] = set()
        self._seeded = False

    def submission_changed(self, sub: Submission, event: str) -> None:
        if event == "uploaded":
            with self._lock:
                when = sub.uploaded_at or self._clock()
                if when > self._last_upload.get(sub.route, when - timedelta(seconds=1)):
                    self._last_upload[sub.route] = when

    def _seed(self) -> None:
        """Last successful upload per route from the journal (once, at the first run)."""
        last: dict[str, datetime] = {}
        for route in self.config.routes:  # one index lookup per route, whatever the history
            when = self.store.last_upload(route.name)
            if when is not None:
                last[route.name] = when
        with self._lock:
            for route, when in last.items():
                if route not in self._last_upload or when > self._last_upload[route]:
                    self._last_upload[route] = when
            self._seeded = True

    @property
    def active(self) -> set[str]:
        """Keys of the problems currently open."""
        return set(self._active)

    def run(self) -> set[str]:
        if not self._seeded:
            self._seed()
        now = self._clock()
        problems: dict[str, Notification] = {}
        self._stuck(now, problems)
        self._routes_down(now, problems)
        for key, n in problems.items():
            self.notifier.notify(n, key)
        for key in self._active - set(problems):
            log.info("problem %s cleared", key)
            self.notifier.resolve(key)
        self._active = set(problems)
        return set(problems)

    def _stuck(self, now: datetime, out: dict[str, Notification]) -> None:
        hours = self.config.tracking.final_timeout_hours
        limit = timedelta(hours=hours)
        # By pages, not a listing of the whole backlog every minute (the daemon's peak memory).
        for sub in iter_submissions(self.store, SubmissionQuery(states=tuple(map(str, PENDING_STATES)))):
            since = sub.uploaded_at or sub.created_at
            if now - since <= limit:
                continue
            age_h = (now - since).total_seconds() / 3600
            what = "uploaded" if sub.uploaded_at else "dropped"
            text = (f"{sub.file_name} ({sub.route}, org {sub.org}, application {sub.application}) was {what} "
                    f"{age_h:.1f} h ago and has no final status from FINRA yet (state {sub.state.value}"
                    + (f", fileX says {sub.remote_status}/{sub.downstream_status}" if sub.remote_status else "")
                    + f", tracking id {sub.tracking_id or 'not matched'}).\n"
                    + (f"Note: {sub.flag}\n" if sub.flag else "")
                    + "Check `filex-agent status` and `filex-agent track`, or ask FINRA about the tracking id.")
            out[f"STUCK:{sub.id}"] = Notification(
                kind="STUCK", subject=f"{sub.file_name}: no final status after {hours:g} h ({sub.route})",
                text=text, submission_id=sub.id, file=sub.file_name, route=sub.route)

    def _failing_since(self, sub: Submission) -> datetime:
        retries = [e.at for e in self.store.events(sub.id) if e.detail == "retry"]
        return min(retries) if retries else sub.updated_at

    def _routes_down(self, now: datetime, out: dict[str, Notification]) -> None:
        minutes = self.config.notify.route_down_minutes
        limit = timedelta(minutes=minutes)
        waiting: dict[str, list[tuple[datetime, Submission]]] = {}
        for sub in iter_submissions(self.store, SubmissionQuery(states=(State.QUEUED.value,))):
            if not sub.reason or sub.attempts == 0 or sub.reason.startswith(WINDOW_REASON):
                continue  # queued for the first time, released, or waiting for its window: not a failure
            waiting.setdefault(sub.route, []).append((self._failing_since(sub), sub))
        for route, subs in waiting.items():
            since = min(t for t, _ in subs)
            with self._lock:
                last_ok = self._last_upload.get(route)
            if now - since <= limit or (last_ok is not None and now - last_ok <= limit):
                continue
            latest = max(subs, key=lambda ts: ts[1].updated_at)[1]
            mins = (now - since).total_seconds() / 60
            text = (f"Route {route} has not been able to submit for {mins:.0f} min; "
                    f"{len(subs)} file(s) are waiting and retried automatically.\n"
                    f"Last error ({latest.file_name}): {latest.reason}\n"
                    + (f"Last successful upload on this route: {last_ok.isoformat(timespec='seconds')}\n"
                       if last_ok else "")
                    + "Check the network, the credential and FINRA's service status; "
                    "`filex-agent doctor` checks the connection step by step.")
            out[f"ROUTE_DOWN:{route}"] = Notification(
                kind="ROUTE_DOWN", subject=f"route {route} cannot submit for {mins:.0f} min", text=text,
                route=route, file=latest.file_name)
