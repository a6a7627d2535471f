"""SQLite journal (WAL, synchronous=FULL): the embedded default store."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from dataclasses import fields as dc_fields
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from filex_agent.errors import FilexError
from filex_agent.fsutil import GroupSync, fsync_path
from filex_agent.logging_setup import redact
from filex_agent.store import (
    OWNED_BY,
    SCHEMA_VERSION,
    Attempt,
    CalendarAlert,
    Duplicate,
    Event,
    FeedbackAlreadyFiled,
    JournalLocked,
    Lead,
    NodeInfo,
    Occurrence,
    SchemaTooNew,
    Outcome,
    StaleEpoch,
    FeedbackFile,
    PageKey,
    REACHED_STATES,
    State,
    StateConflict,
    Store,
    Submission,
    Transition,
    SubmissionPage,
    SubmissionQuery,
    feedback_instant,
    open_state_names,
    utcnow,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS submissions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    route TEXT NOT NULL, org TEXT NOT NULL, application TEXT NOT NULL, transport TEXT NOT NULL,
    file_name TEXT NOT NULL, source_path TEXT NOT NULL, local_path TEXT NOT NULL,
    state TEXT NOT NULL, size INTEGER, mtime_ns INTEGER, sha256 TEXT, reason TEXT,
    tracking_id TEXT, upload_location TEXT, remote_status TEXT, downstream_status TEXT,
    move_to TEXT, attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at TEXT,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL, upload_started_at TEXT, uploaded_at TEXT,
    final_at TEXT, held_by INTEGER, flag TEXT,
    owner TEXT, lease_until TEXT, epoch INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS submissions_state ON submissions(state);
CREATE INDEX IF NOT EXISTS submissions_route_state ON submissions(route, state);
CREATE INDEX IF NOT EXISTS submissions_sha ON submissions(org, application, sha256);
CREATE UNIQUE INDEX IF NOT EXISTS submissions_tracking ON submissions(tracking_id) WHERE tracking_id IS NOT NULL;
-- One claim per outbox file at a time: a second agent's claim of the same file is refused (Duplicate).
CREATE UNIQUE INDEX IF NOT EXISTS submissions_claiming ON submissions(source_path) WHERE state = 'CLAIMING';
CREATE INDEX IF NOT EXISTS submissions_route_stem ON submissions(route, {stem});
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    submission_id INTEGER NOT NULL REFERENCES submissions(id),
    at TEXT NOT NULL, state TEXT NOT NULL, detail TEXT
);
CREATE INDEX IF NOT EXISTS events_sub ON events(submission_id);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    route TEXT NOT NULL, remote_name TEXT NOT NULL, remote_size INTEGER, remote_modified TEXT,
    local_path TEXT, submission_id INTEGER REFERENCES submissions(id), downloaded_at TEXT,
    UNIQUE(route, remote_name, remote_size, remote_modified)
);
CREATE INDEX IF NOT EXISTS feedback_sub ON feedback(submission_id);
CREATE INDEX IF NOT EXISTS submissions_route_created ON submissions(route, created_at);
CREATE TABLE IF NOT EXISTS calendar_occurrences (
    expectation TEXT NOT NULL, deadline TEXT NOT NULL,
    opens_at TEXT NOT NULL, closes_at TEXT NOT NULL, route TEXT NOT NULL, pattern TEXT NOT NULL,
    label TEXT NOT NULL, state TEXT NOT NULL, on_time INTEGER, submission_id INTEGER, verdict TEXT,
    early_close INTEGER NOT NULL DEFAULT 0, closed INTEGER NOT NULL DEFAULT 0, updated_at TEXT NOT NULL,
    PRIMARY KEY (expectation, deadline)
);
CREATE INDEX IF NOT EXISTS calendar_occurrences_open ON calendar_occurrences(closed, expectation);
CREATE TABLE IF NOT EXISTS calendar_alerts (
    expectation TEXT NOT NULL, deadline TEXT NOT NULL, kind TEXT NOT NULL,
    first_sent_at TEXT NOT NULL, last_sent_at TEXT NOT NULL, sent_count INTEGER NOT NULL, cleared_at TEXT,
    PRIMARY KEY (expectation, deadline, kind)
);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    submission_id INTEGER NOT NULL REFERENCES submissions(id),
    n INTEGER NOT NULL, transport TEXT NOT NULL, remote_name TEXT NOT NULL, upload_location TEXT NOT NULL,
    owner TEXT NOT NULL, epoch INTEGER NOT NULL, started_at TEXT NOT NULL, outcome TEXT NOT NULL,
    committed_at TEXT, tracking_id TEXT, ended_at TEXT, detail TEXT, decide_by TEXT,
    UNIQUE(submission_id, n)
);
CREATE INDEX IF NOT EXISTS attempts_outcome ON attempts(outcome);
CREATE TABLE IF NOT EXISTS alerts (
    submission_id INTEGER NOT NULL REFERENCES submissions(id), kind TEXT NOT NULL, sent_at TEXT NOT NULL,
    PRIMARY KEY (submission_id, kind)
);
-- The status web page (read-only views): keyset pages newest first, with or without a filter on
-- state or route; a file name prefix; outcomes by final time; latency by upload time; flags.
CREATE INDEX IF NOT EXISTS submissions_created ON submissions(created_at, id);
CREATE INDEX IF NOT EXISTS submissions_state_created ON submissions(state, created_at, id);
CREATE INDEX IF NOT EXISTS submissions_route_created ON submissions(route, created_at, id);
CREATE INDEX IF NOT EXISTS submissions_name ON submissions(file_name);
CREATE INDEX IF NOT EXISTS submissions_final ON submissions(final_at, state, route);
CREATE INDEX IF NOT EXISTS submissions_uploaded_created ON submissions(uploaded_at, created_at);
CREATE INDEX IF NOT EXISTS submissions_flag ON submissions(id) WHERE flag IS NOT NULL;
-- Work that must not cost a scan of the history: moves to finish at start-up, a route's last upload.
CREATE INDEX IF NOT EXISTS submissions_move ON submissions(id) WHERE move_to IS NOT NULL;
CREATE INDEX IF NOT EXISTS submissions_route_uploaded ON submissions(route, uploaded_at);
-- Bookkeeping of the store itself (e.g. how far a one-off rewrite got), never copied elsewhere.
CREATE TABLE IF NOT EXISTS store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    node TEXT PRIMARY KEY, started_at TEXT NOT NULL, heartbeat_at TEXT NOT NULL, info TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS leaders (
    name TEXT PRIMARY KEY, owner TEXT NOT NULL, lease_until TEXT NOT NULL, epoch INTEGER NOT NULL DEFAULT 1
);
"""
# States whose alert waits (for the feedback file) and so must survive a restart.
_ALERTED_STATES = ("REJECTED", "PARTIALLY_REJECTED")

# A file name without its last extension, as pathlib's ``stem`` (SQLite has no rpartition: rtrim
# drops every character but '.' from the right, leaving the name up to its last dot). Feedback
# linking looks stems up through an index on exactly this expression.
_UP_TO_LAST_DOT = "rtrim(file_name, replace(file_name, '.', ''))"
STEM_SQL = (f"(CASE WHEN instr(file_name, '.') <= 1 THEN file_name "
            f"ELSE substr({_UP_TO_LAST_DOT}, 1, length({_UP_TO_LAST_DOT}) - 1) END)")
SCHEMA = SCHEMA.replace("{stem}", STEM_SQL)

# Columns added after the first release: (table, column, declaration). Added to an older journal
# at open; ``user_version`` records the schema version reached (SCHEMA_VERSION, shared with
# PostgreSQL: 2 added leases and attempts, 3 the nodes and leaders tables).
_ADDED_COLUMNS = [
    ("submissions", "owner", "TEXT"),
    ("submissions", "lease_until", "TEXT"),
    ("submissions", "epoch", "INTEGER NOT NULL DEFAULT 0"),
]

_DT_FIELDS = {"next_attempt_at", "created_at", "updated_at", "upload_started_at", "uploaded_at", "final_at",
              "lease_until"}
_SUB_FIELDS = [f.name for f in dc_fields(Submission)]
_ATTEMPT_FIELDS = [f.name for f in dc_fields(Attempt)]
_ATTEMPT_DT = {"started_at", "committed_at", "ended_at", "decide_by"}


# Free text that may carry an exception's message: scrubbed like a log line before it is kept
# (the journal is read by `status`, the audit trail, alerts and reason files).
_TEXT_FIELDS = frozenset({"reason", "flag"})


def _enc(key: str, value: Any) -> Any:
    if key in _TEXT_FIELDS and isinstance(value, str):
        return redact(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, State):
        return value.value
    return value


def _where(states: Iterable[State] | None, route: str | None) -> tuple[str, list[Any]]:
    """The WHERE clause (and its arguments) selecting submissions in ``states`` on ``route``."""
    sql, args = "1=1", []
    if states is not None:
        names = [str(s) for s in states]
        sql += f" AND state IN ({', '.join('?' for _ in names)})"
        args += names
    if route is not None:
        sql += " AND route = ?"
        args.append(route)
    return sql, args


_OCC_COLS = ("expectation", "deadline", "opens_at", "closes_at", "route", "pattern", "label", "state", "on_time",
             "submission_id", "verdict", "early_close", "closed", "updated_at")


def _ts(value: datetime) -> str:
    """Instants as ISO text in UTC: one spelling per instant, so keys and text comparisons agree."""
    return value.astimezone(timezone.utc).isoformat()


def _row_to_occ(row: sqlite3.Row) -> Occurrence:
    return Occurrence(
        expectation=row["expectation"], deadline=datetime.fromisoformat(row["deadline"]),
        opens_at=datetime.fromisoformat(row["opens_at"]), closes_at=datetime.fromisoformat(row["closes_at"]),
        route=row["route"], pattern=row["pattern"], label=row["label"], state=row["state"],
        on_time=None if row["on_time"] is None else bool(row["on_time"]), submission_id=row["submission_id"],
        verdict=row["verdict"], early_close=bool(row["early_close"]), closed=bool(row["closed"]),
        updated_at=datetime.fromisoformat(row["updated_at"]))


def _marks(values: Sequence[Any]) -> str:
    return ", ".join("?" for _ in values)


# A name prefix matching at least this many rows is served by walking the newest rows first
# (they match densely); a rarer one by the name index and a sort of its (few) matches.
DENSE_PREFIX = 2000


def _prefix_bounds(text: str) -> list[str]:
    # A prefix as a range (not LIKE 'x%'): an index serves it whatever the collation options.
    return [text, text + "\U0010ffff"]


def _query_where(q: SubmissionQuery, name_term: str = "file_name >= ? AND file_name < ?") -> tuple[list[str], list[Any]]:
    """WHERE terms (ANDed) and arguments of a web search, but for ``text``'s tracking id."""
    terms: list[str] = []
    args: list[Any] = []
    if q.text:
        terms.append(name_term)
        args += _prefix_bounds(q.text)
    if q.states is not None:
        terms.append(f"state IN ({_marks(q.states) or 'NULL'})")
        args += list(q.states)
    if q.route is not None:
        terms.append("route = ?")
        args.append(q.route)
    if q.created_from is not None:
        terms.append("created_at >= ?")
        args.append(_ts(q.created_from))
    if q.created_to is not None:
        terms.append("created_at < ?")
        args.append(_ts(q.created_to))
    return terms, args


def _row_to_sub(row: sqlite3.Row) -> Submission:
    data = {k: row[k] for k in _SUB_FIELDS}
    for k in _DT_FIELDS:
        if data[k] is not None:
            data[k] = datetime.fromisoformat(data[k])
    data["state"] = State(data["state"])
    return Submission(**data)


def _row_to_attempt(row: sqlite3.Row) -> Attempt:
    data = {k: row[k] for k in _ATTEMPT_FIELDS}
    for k in _ATTEMPT_DT:
        if data[k] is not None:
            data[k] = datetime.fromisoformat(data[k])
    data["outcome"] = Outcome(data["outcome"])
    return Attempt(**data)


class JournalOwnerError(FilexError):
    """root about to open (and so create root-owned -wal/-shm files in) another user's journal."""


def _refuse_foreign_journal_as_root(path: Path) -> None:
    """As root, SQLite would create ``-wal``/``-shm`` (or the journal itself) owned by root, which
    the daemon, running as its own user, then cannot open: refuse, naming the owner."""
    if os.geteuid() != 0:
        return
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm"), path.parent):
        try:
            uid = os.stat(p).st_uid
        except FileNotFoundError:
            continue
        if uid != 0:
            try:
                import pwd

                user = pwd.getpwuid(uid).pw_name
            except (ImportError, KeyError):
                user = str(uid)
            raise JournalOwnerError(
                f"the journal {path} belongs to {user}; as root this command would leave files there the "
                f"agent cannot open. Run it as that user: sudo -u {user} filex-agent ...")
        if p == path:  # the journal exists and is root's: its folder does not matter
            break


class SQLiteStore(Store):
    def __init__(self, path: Path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _refuse_foreign_journal_as_root(path)
        self.path = path
        # One connection guarded by a lock: writes are small and serialised anyway.
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._group = GroupSync(self._fsync_wal)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            # A state change is on disk before the action it allows, as with synchronous=FULL, but
            # by group commit: SQLite commits to the WAL without fsync (NORMAL), and every write
            # method returns only after an fsync of the WAL that began after its COMMIT
            # (``_durable``), one fsync shared by all the threads that committed meanwhile.
            # NORMAL still fsyncs the WAL before each checkpoint and the database after it.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        self._group.sync()  # what the migration wrote
        self._reader: sqlite3.Connection | None = None  # read-only views; opened when first used
        self._reader_lock = threading.Lock()

    def _migrate(self) -> None:
        found = self._db.execute("PRAGMA user_version").fetchone()[0]
        if found > SCHEMA_VERSION:
            raise SchemaTooNew(found, SCHEMA_VERSION, str(self.path))
        have = {r[1] for r in self._db.execute("PRAGMA table_info(submissions)")}
        if have:  # an older journal: add what later versions added before the indexes use it
            for table, col, decl in _ADDED_COLUMNS:
                if col not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {col} {decl}")
        had_alerts = bool(self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alerts'").fetchone())
        self._db.executescript(SCHEMA)
        if have and not had_alerts:
            # A journal from before alerts were journaled: its final rows were alerted then (a
            # graceful stop sends every waiting alert); do not alert the whole history again.
            self._db.execute(
                "INSERT OR IGNORE INTO alerts (submission_id, kind, sent_at) SELECT id, state, ? FROM submissions "
                f"WHERE state IN ({', '.join('?' for _ in _ALERTED_STATES)})",
                (utcnow().isoformat(), *_ALERTED_STATES))
        if self._db.execute("PRAGMA user_version").fetchone()[0] < 2:
            # Uploads a pre-attempts agent left UPLOADING get the attempt row it would have
            # written: committed (bytes may have landed) unless REST without a tracking id, the
            # one case where the old journal proves no byte left.
            self._db.execute(
                "INSERT INTO attempts (submission_id, n, transport, remote_name, upload_location, owner, epoch, "
                "started_at, outcome, committed_at, tracking_id) "
                "SELECT id, 1, transport, file_name, org || '/' || application || '/in', 'before-upgrade', epoch, "
                "COALESCE(upload_started_at, updated_at), 'PENDING', "
                "CASE WHEN transport = 'rest' AND tracking_id IS NULL THEN NULL "
                "ELSE COALESCE(upload_started_at, updated_at) END, tracking_id "
                "FROM submissions s WHERE state = 'UPLOADING' "
                "AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.submission_id = s.id)")
        self._normalise_feedback_times()
        self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _normalise_feedback_times(self) -> None:
        """Feedback rows written before ``feedback_instant`` hold the transport's own text: rewrite
        them once, so the key matches whichever transport lists the file now. A row whose
        normalised key exists already (the same file filed twice by that very defect) keeps its
        text; ``feedback_keys`` still normalises it on read.

        Only rows added since the last open are looked at (``store_meta`` remembers the last id
        checked): opening a journal with years of feedback reads none of it."""
        mark = self._db.execute("SELECT value FROM store_meta WHERE key = 'feedback_times_checked'").fetchone()
        checked = int(mark[0]) if mark else 0
        top = self._db.execute("SELECT COALESCE(MAX(id), 0) FROM feedback").fetchone()[0]
        if top == checked:
            return
        rows = self._db.execute("SELECT id, route, remote_name, remote_size, remote_modified FROM feedback "
                                "WHERE id > ? AND id <= ? AND remote_modified IS NOT NULL AND remote_modified NOT GLOB "
                                "'[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z'",
                                (checked, top)).fetchall()
        with self._tx() as db:
            db.execute("INSERT INTO store_meta (key, value) VALUES ('feedback_times_checked', ?) "
                       "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (str(top),))
            for r in rows:
                norm = feedback_instant(r["remote_modified"])
                if norm == r["remote_modified"] or db.execute(
                        "SELECT 1 FROM feedback WHERE route = ? AND remote_name = ? AND remote_size IS ? "
                        "AND remote_modified = ?", (r["route"], r["remote_name"], r["remote_size"], norm)).fetchone():
                    continue
                db.execute("UPDATE feedback SET remote_modified = ? WHERE id = ?", (norm, r["id"]))

    # -- helpers -------------------------------------------------------------------------
    def _tx(self):
        return _Tx(self)

    def _fsync_wal(self) -> None:
        # No WAL file: a checkpoint moved everything into the database file (and fsynced it).
        if not fsync_path(f"{self.path}-wal"):
            fsync_path(self.path)

    def _check_fields(self, fields: dict[str, Any]) -> None:
        bad = set(fields) - set(_SUB_FIELDS) - {"id"}
        if bad:
            raise KeyError(f"unknown submission fields: {sorted(bad)}")

    # -- submissions ---------------------------------------------------------------------
    def create(self, **fields: Any) -> Submission:
        self._check_fields(fields)
        now = utcnow()
        fields.setdefault("created_at", now)
        fields["updated_at"] = now
        state = fields.setdefault("state", State.CLAIMING)
        cols = list(fields)
        with self._tx() as db:
            cur = db.execute(
                f"INSERT INTO submissions ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
                [_enc(k, fields[k]) for k in cols],
            )
            sub_id = cur.lastrowid
            db.execute("INSERT INTO events (submission_id, at, state, detail) VALUES (?, ?, ?, ?)",
                       (sub_id, now.isoformat(), str(state), "created"))
        return self.get(sub_id)

    def create_claims(self, fields: dict[str, Any], files: Sequence[tuple[str, str]],
                      local_path_of: Callable[[int, str], str]) -> list[Submission | None]:
        self._check_fields(fields)
        now = utcnow()
        common = {**fields, "created_at": now, "updated_at": now, "state": State.CLAIMING}
        cols = list(common) + ["file_name", "source_path", "local_path"]
        insert = f"INSERT INTO submissions ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})"
        head = [_enc(k, v) for k, v in common.items()]
        ids: list[int | None] = []
        with self._tx() as db:
            for name, source in files:
                try:
                    sub_id = db.execute(insert, head + [name, source, source]).lastrowid
                except sqlite3.IntegrityError as exc:
                    if "UNIQUE" not in str(exc):
                        raise
                    ids.append(None)  # another agent's claim of this very file: only this row is undone
                    continue
                db.execute("UPDATE submissions SET local_path = ? WHERE id = ?", (local_path_of(sub_id, name), sub_id))
                db.execute("INSERT INTO events (submission_id, at, state, detail) VALUES (?, ?, ?, ?)",
                           (sub_id, now.isoformat(), State.CLAIMING.value, "created"))
                ids.append(sub_id)
        got = self.get_many([i for i in ids if i is not None])
        return [None if i is None else got[i] for i in ids]

    def get_many(self, ids: Sequence[int]) -> dict[int, Submission]:
        out: dict[int, Submission] = {}
        ids = list(ids)
        with self._lock:
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                rows = self._db.execute(f"SELECT * FROM submissions WHERE id IN ({', '.join('?' for _ in chunk)})",
                                        chunk).fetchall()
                out.update((r["id"], _row_to_sub(r)) for r in rows)
        return out

    def transition_many(self, steps: Sequence[Transition]) -> list[Submission | StateConflict]:
        now = utcnow()
        out: list[Submission | StateConflict] = []
        with self._tx() as db:
            for step in steps:
                self._check_fields(step.fields)
                row = db.execute("SELECT state FROM submissions WHERE id = ?", (step.sub_id,)).fetchone()
                if row is None:
                    raise KeyError(f"no submission {step.sub_id}")
                if step.expect is not None and row["state"] not in {str(s) for s in step.expect}:
                    out.append(StateConflict(f"submission {step.sub_id} is {row['state']}, expected one of "
                                             f"{sorted(map(str, step.expect))}"))
                    continue
                fields = {**step.fields, "state": step.state, "updated_at": now}
                sets = ", ".join(f"{k} = ?" for k in fields)
                db.execute(f"UPDATE submissions SET {sets} WHERE id = ?",
                           [_enc(k, v) for k, v in fields.items()] + [step.sub_id])
                db.execute("INSERT INTO events (submission_id, at, state, detail) VALUES (?, ?, ?, ?)",
                           (step.sub_id, now.isoformat(), str(step.state),
                            None if step.detail is None else redact(step.detail)))
                out.append(_row_to_sub(db.execute("SELECT * FROM submissions WHERE id = ?", (step.sub_id,)).fetchone()))
        return out

    def get(self, sub_id: int) -> Submission:
        with self._lock:
            row = self._db.execute("SELECT * FROM submissions WHERE id = ?", (sub_id,)).fetchone()
        if row is None:
            raise KeyError(f"no submission {sub_id}")
        return _row_to_sub(row)

    def list(self, states: Iterable[State] | None = None, route: str | None = None) -> list[Submission]:
        where, args = _where(states, route)
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM submissions WHERE {where} ORDER BY id", args).fetchall()
        return [_row_to_sub(r) for r in rows]

    def count(self, states: Iterable[State], route: str | None = None) -> dict[str, int]:
        where, args = _where(states, route)
        with self._lock:
            rows = self._db.execute(f"SELECT route, COUNT(*) FROM submissions WHERE {where} GROUP BY route",
                                    args).fetchall()
        return {r[0]: int(r[1]) for r in rows}

    def due(self, now: datetime, limit: int) -> list[int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM submissions WHERE state = 'QUEUED' AND (next_attempt_at IS NULL OR next_attempt_at <= ?) "
                "ORDER BY id LIMIT ?", (now.isoformat(), limit)).fetchall()
        return [r[0] for r in rows]

    def transition(self, sub_id: int, state: State, detail: str | None = None, *,
                   expect: Iterable[State] | None = None, epoch: int | None = None, **fields: Any) -> Submission:
        self._check_fields(fields)
        now = utcnow()
        fields.update(state=state, updated_at=now)
        with self._tx() as db:
            self._transition_in(db, sub_id, state, detail, expect, epoch, fields, now)
        return self.get(sub_id)

    @staticmethod
    def _transition_in(db: sqlite3.Connection, sub_id: int, state: State, detail: str | None,
                       expect: Iterable[State] | None, epoch: int | None, fields: dict[str, Any],
                       now: datetime) -> None:
        row = db.execute("SELECT state, epoch FROM submissions WHERE id = ?", (sub_id,)).fetchone()
        if row is None:
            raise KeyError(f"no submission {sub_id}")
        _fence(sub_id, row["epoch"], epoch)
        if expect is not None and row["state"] not in {str(s) for s in expect}:
            raise StateConflict(f"submission {sub_id} is {row['state']}, expected one of {sorted(map(str, expect))}")
        sets = ", ".join(f"{k} = ?" for k in fields)
        db.execute(f"UPDATE submissions SET {sets} WHERE id = ?", [_enc(k, v) for k, v in fields.items()] + [sub_id])
        db.execute("INSERT INTO events (submission_id, at, state, detail) VALUES (?, ?, ?, ?)",
                   (sub_id, now.isoformat(), str(state), None if detail is None else redact(detail)))

    def settle(self, attempt_id: int, outcome: Outcome, detail: str | None, step: Transition, *, epoch: int,
               decide_by: datetime | None = None) -> Submission:
        self._check_fields(step.fields)
        now = utcnow()
        fields = {**step.fields, "state": step.state, "updated_at": now}
        with self._tx() as db:
            self._end_attempt_in(db, attempt_id, outcome, detail, epoch, decide_by, now)
            self._transition_in(db, step.sub_id, step.state, step.detail, step.expect, epoch, fields, now)
        return self.get(step.sub_id)

    def update(self, sub_id: int, *, epoch: int | None = None, **fields: Any) -> Submission:
        self._check_fields(fields)
        fields["updated_at"] = utcnow()
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._tx() as db:
            if epoch is not None:
                row = db.execute("SELECT epoch FROM submissions WHERE id = ?", (sub_id,)).fetchone()
                _fence(sub_id, row["epoch"] if row else None, epoch)
            db.execute(f"UPDATE submissions SET {sets} WHERE id = ?", [_enc(k, v) for k, v in fields.items()] + [sub_id])
        return self.get(sub_id)

    def events(self, sub_id: int) -> list[Event]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM events WHERE submission_id = ? ORDER BY id", (sub_id,)).fetchall()
        return [Event(r["submission_id"], datetime.fromisoformat(r["at"]), r["state"], r["detail"]) for r in rows]

    def events_many(self, sub_ids: Sequence[int]) -> dict[int, list[Event]]:
        out: dict[int, list[Event]] = {i: [] for i in sub_ids}
        ids = list(out)
        with self._lock:
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                rows = self._db.execute(
                    f"SELECT * FROM events WHERE submission_id IN ({', '.join('?' for _ in chunk)}) ORDER BY id",
                    chunk).fetchall()
                for r in rows:
                    out[r["submission_id"]].append(
                        Event(r["submission_id"], datetime.fromisoformat(r["at"]), r["state"], r["detail"]))
        return out

    def by_tracking_id(self, tracking_id: str) -> Submission | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM submissions WHERE tracking_id = ?", (tracking_id,)).fetchone()
        return None if row is None else _row_to_sub(row)

    def discard_claim(self, sub_id: int) -> bool:
        with self._tx() as db:
            row = db.execute("SELECT state, source_path, created_at FROM submissions WHERE id = ?", (sub_id,)).fetchone()
            if row is None or row["state"] != State.CLAIMING.value:
                return False
            since = (datetime.fromisoformat(row["created_at"]) - timedelta(hours=1)).isoformat()
            if not db.execute("SELECT 1 FROM submissions WHERE source_path = ? AND id != ? AND state != 'FAILED' "
                              "AND created_at >= ?", (row["source_path"], sub_id, since)).fetchone():
                return False
            db.execute("DELETE FROM events WHERE submission_id = ?", (sub_id,))
            db.execute("DELETE FROM submissions WHERE id = ?", (sub_id,))
            return True

    def find_same_content(self, org: str, application: str, sha256: str, exclude_id: int) -> Submission | None:
        states = ("CLAIMING", "QUEUED", "UPLOADING", "SUBMITTED", "ACCEPTED")
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM submissions WHERE org = ? AND application = ? AND sha256 = ? AND id != ? "
                f"AND state IN ({', '.join('?' for _ in states)}) ORDER BY id LIMIT 1",
                (org, application, sha256, exclude_id, *states)).fetchone()
        return None if row is None else _row_to_sub(row)

    # -- feedback ------------------------------------------------------------------------
    def feedback_seen(self, route: str, remote_name: str, remote_size: int | None,
                      remote_modified: str | None) -> bool:
        remote_modified = feedback_instant(remote_modified)
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM feedback WHERE route = ? AND remote_name = ? AND remote_size IS ? "
                "AND remote_modified IS ? AND downloaded_at IS NOT NULL",
                (route, remote_name, remote_size, remote_modified)).fetchone()
        return row is not None

    def feedback_keys(self, route: str, names: Iterable[str] | None = None) -> tuple[set, set]:
        filed: set = set()
        doubt: set = set()
        sql = "SELECT remote_name, remote_size, remote_modified, downloaded_at FROM feedback WHERE route = ?"
        rows: list[sqlite3.Row] = []
        with self._lock:
            if names is None:
                rows = self._db.execute(sql, (route,)).fetchall()
            else:
                # One statement whatever the size of the listing (a JSON array, not one parameter per
                # name): each name is looked up through the (route, remote_name, ...) key.
                rows = self._db.execute(f"{sql} AND remote_name IN (SELECT value FROM json_each(?))",
                                        (route, json.dumps(sorted(set(names))))).fetchall()
        for r in rows:
            (filed if r[3] is not None else doubt).add((r[0], r[1], feedback_instant(r[2])))
        return filed, doubt

    def route_has_history(self, route: str) -> bool:
        with self._lock:
            return any(self._db.execute(f"SELECT 1 FROM {table} WHERE route = ? LIMIT 1", (route,)).fetchone()
                       for table in ("submissions", "feedback"))

    def pending_moves(self) -> list[Submission]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM submissions WHERE move_to IS NOT NULL ORDER BY id").fetchall()
        return [_row_to_sub(r) for r in rows]

    def last_upload(self, route: str) -> datetime | None:
        with self._lock:
            row = self._db.execute("SELECT MAX(uploaded_at) FROM submissions WHERE route = ?", (route,)).fetchone()
        return datetime.fromisoformat(row[0]) if row[0] else None

    def begin_feedback(self, route: str, remote_name: str, remote_size: int | None,
                       remote_modified: str | None) -> None:
        remote_modified = feedback_instant(remote_modified)
        with self._tx() as db:
            row = db.execute(
                "SELECT id FROM feedback WHERE route = ? AND remote_name = ? AND remote_size IS ? AND remote_modified IS ?",
                (route, remote_name, remote_size, remote_modified)).fetchone()
            if row is None:
                db.execute("INSERT INTO feedback (route, remote_name, remote_size, remote_modified) VALUES (?, ?, ?, ?)",
                           (route, remote_name, remote_size, remote_modified))

    def record_feedback(self, route: str, remote_name: str, remote_size: int | None,
                        remote_modified: str | None, local_path: str | None,
                        submission_id: int | None) -> FeedbackFile:
        """Confirm a download (completing a ``begin_feedback`` row if there is one)."""
        remote_modified = feedback_instant(remote_modified)
        now = utcnow().isoformat()
        with self._tx() as db:
            row = db.execute(
                "SELECT id, downloaded_at, local_path FROM feedback WHERE route = ? AND remote_name = ? "
                "AND remote_size IS ? AND remote_modified IS ?",
                (route, remote_name, remote_size, remote_modified)).fetchone()
            if row is not None and row[1] is not None:
                # Filed already: a second record would mean a second copy (the invariant is "once").
                raise FeedbackAlreadyFiled(f"feedback {remote_name!r} of route {route} is filed already"
                                           + (f" as {row[2]}" if row[2] else ""), row[2])
            if row is None:
                try:
                    fid = db.execute(
                        "INSERT INTO feedback (route, remote_name, remote_size, remote_modified, local_path, "
                        "submission_id, downloaded_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (route, remote_name, remote_size, remote_modified, local_path, submission_id, now)).lastrowid
                except sqlite3.IntegrityError as exc:  # the UNIQUE key: the store's conflict, not SQLite's
                    raise FeedbackAlreadyFiled(f"feedback {remote_name!r} of route {route} is filed already") from exc
            else:
                fid = row[0]
                db.execute("UPDATE feedback SET local_path = ?, submission_id = ?, downloaded_at = ? WHERE id = ?",
                           (local_path, submission_id, now, fid))
        return FeedbackFile(fid, route, remote_name, remote_size, remote_modified, local_path, submission_id,
                            datetime.fromisoformat(now))

    def feedback_for(self, sub_id: int) -> list[FeedbackFile]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM feedback WHERE submission_id = ? AND downloaded_at IS NOT NULL "
                                    "ORDER BY id", (sub_id,)).fetchall()
        return [FeedbackFile(r["id"], r["route"], r["remote_name"], r["remote_size"], r["remote_modified"],
                             r["local_path"], r["submission_id"],
                             datetime.fromisoformat(r["downloaded_at"]) if r["downloaded_at"] else None)
                for r in rows]

    # -- read-only views (the status web page) ------------------------------------------
    def _rows(self, sql: str, args: Sequence[Any]) -> list[sqlite3.Row]:
        # A connection of their own (WAL: readers never block the writer): a page being
        # rendered never holds up a journal write of the daemon.
        with self._reader_lock:
            if self._reader is None:
                self._reader = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                                               check_same_thread=False, timeout=30)
                self._reader.row_factory = sqlite3.Row
            return self._reader.execute(sql, list(args)).fetchall()

    def search(self, query: SubmissionQuery, limit: int = 50, *, after: PageKey | None = None,
               before: PageKey | None = None) -> SubmissionPage:
        if query.text:
            rest, rest_args = _query_where(replace(query, text=None))
            hit = self._rows(" AND ".join(["SELECT * FROM submissions WHERE tracking_id = ?", *rest]),
                             [query.text, *rest_args])
            if hit:
                return SubmissionPage([_row_to_sub(hit[0])], None, None)
        name_term = "file_name >= ? AND file_name < ?"
        if query.text:
            probe = self._rows("SELECT COUNT(*) FROM (SELECT 1 FROM submissions WHERE file_name >= ? "
                               "AND file_name < ? LIMIT ?) AS m", [*_prefix_bounds(query.text), DENSE_PREFIX])
            if probe[0][0] >= DENSE_PREFIX:
                # Dense: "+" keeps SQLite's planner off the name index (it has no idea how many
                # rows a range holds) so it walks (created_at, id) and stops after one page.
                name_term = "+file_name >= ? AND +file_name < ?"
        terms, args = _query_where(query, name_term)
        base_terms, base_args = list(terms), list(args)
        # Row values (standard SQL; SQLite and PostgreSQL both seek an index with them; the
        # equivalent OR made SQLite walk the index from the top: 0.2 s for a page half a year back).
        if after is not None:
            terms.append("(created_at, id) < (?, ?)")
            args += [_ts(after.created_at), after.id]
        if before is not None:
            terms.append("(created_at, id) > (?, ?)")
            args += [_ts(before.created_at), before.id]
        where = " AND ".join(terms) or "1=1"
        order = "ASC" if before is not None else "DESC"
        rows = self._rows(f"SELECT * FROM submissions WHERE {where} ORDER BY created_at {order}, id {order} "
                          "LIMIT ?", [*args, limit + 1])
        more = len(rows) > limit
        subs = [_row_to_sub(r) for r in rows[:limit]]
        if before is not None:
            subs.reverse()
        if not subs:
            return SubmissionPage([], None, None)
        first, last = PageKey(subs[0].created_at, subs[0].id), PageKey(subs[-1].created_at, subs[-1].id)
        if before is not None:
            return SubmissionPage(subs, last if self._exists(base_terms, base_args, last, older=True) else None,
                                  first if more else None)
        newer = after is not None and self._exists(base_terms, base_args, first, older=False)
        return SubmissionPage(subs, last if more else None, first if newer else None)

    def _exists(self, terms: list[str], args: list[Any], key: PageKey, *, older: bool) -> bool:
        op = "<" if older else ">"
        cond = " AND ".join([*terms, f"(created_at, id) {op} (?, ?)"])
        return bool(self._rows(f"SELECT 1 FROM submissions WHERE {cond} LIMIT 1",
                               [*args, _ts(key.created_at), key.id]))

    def open_counts(self) -> dict[tuple[str, str], int]:
        names = open_state_names()
        rows = self._rows(f"SELECT route, state, COUNT(*) FROM submissions WHERE state IN ({_marks(names)}) "
                          "GROUP BY route, state", names)
        return {(r[0], r[1]): int(r[2]) for r in rows}

    def final_counts(self, since: datetime, until: datetime) -> dict[tuple[str, str], int]:
        # Both bounds: with only one, SQLite's planner walks (route, state) over the whole table.
        rows = self._rows("SELECT route, state, COUNT(*) FROM submissions WHERE final_at >= ? AND final_at < ? "
                          "GROUP BY route, state", [_ts(since), _ts(until)])
        return {(r[0], r[1]): int(r[2]) for r in rows}

    def final_histogram(self, edges: Sequence[datetime]) -> dict[tuple[int, str], int]:
        if len(edges) < 2:
            return {}
        bounds = [_ts(e) for e in edges]
        # One pass over the final_at index: CASE numbers the bin of each row (portable SQL).
        case = " ".join(f"WHEN final_at < ? THEN {i}" for i in range(len(bounds) - 1))
        rows = self._rows(f"SELECT CASE {case} END AS bin, state, COUNT(*) FROM submissions "
                          "WHERE final_at >= ? AND final_at < ? GROUP BY bin, state",
                          [*bounds[1:], bounds[0], bounds[-1]])
        return {(int(r[0]), r[1]): int(r[2]) for r in rows}

    def latency_histogram(self, edges: Sequence[datetime], bounds: Sequence[float]) -> dict[tuple[int, int], int]:
        if len(edges) < 2:
            return {}
        days = [_ts(e) for e in edges]
        day_case = " ".join(f"WHEN uploaded_at < ? THEN {i}" for i in range(len(days) - 1))
        bucket_case = " ".join(f"WHEN s <= ? THEN {j}" for j in range(len(bounds)))
        # MATERIALIZED: the difference is computed once per row, not once per WHEN.
        rows = self._rows(
            f"WITH t AS MATERIALIZED (SELECT CASE {day_case} END AS bin, "
            "(julianday(uploaded_at) - julianday(created_at)) * 86400.0 AS s FROM submissions "
            f"WHERE uploaded_at >= ? AND uploaded_at < ?) SELECT bin, CASE {bucket_case} ELSE {len(bounds)} END "
            "AS bucket, COUNT(*) FROM t GROUP BY bin, bucket", [*days[1:], days[0], days[-1], *bounds])
        return {(int(r[0]), int(r[1])): int(r[2]) for r in rows}

    def problems(self, states: Iterable[str], open_before: datetime, limit: int) -> list[Submission]:
        states = tuple(states)
        names = open_state_names()
        # Three indexed selections (flag, state, open states), merged: an OR across them would
        # make SQLite scan the table.
        ids: set[int] = set()
        ids |= {r[0] for r in self._rows("SELECT id FROM submissions WHERE flag IS NOT NULL ORDER BY id DESC "
                                         "LIMIT ?", [limit])}
        if states:
            ids |= {r[0] for r in self._rows(f"SELECT id FROM submissions WHERE state IN ({_marks(states)}) "
                                             "ORDER BY id DESC LIMIT ?", [*states, limit])}
        before = _ts(open_before)
        ids |= {r[0] for r in self._rows(
            f"SELECT id FROM submissions WHERE state IN ({_marks(names)}) "
            "AND COALESCE(uploaded_at, created_at) < ? ORDER BY id DESC LIMIT ?", [*names, before, limit])}
        keep = sorted(ids, reverse=True)[:limit]
        if not keep:
            return []
        rows = self._rows(f"SELECT * FROM submissions WHERE id IN ({_marks(keep)}) ORDER BY id DESC", keep)
        return [_row_to_sub(r) for r in rows]

    def feedback_file(self, sub_id: int, feedback_id: int) -> FeedbackFile | None:
        return next((f for f in self.feedback_for(sub_id) if f.id == feedback_id), None)

    def feedback_candidates(self, route: str, parts: Iterable[str]) -> list[Submission]:
        parts = sorted(set(parts))
        states = [str(st) for st in REACHED_STATES]
        in_states = f"state IN ({', '.join('?' for _ in states)})"
        found: dict[int, Submission] = {}
        with self._lock:
            for i in range(0, len(parts), 400):  # well under SQLite's bound on parameters
                chunk = parts[i:i + 400]
                marks = ", ".join("?" for _ in chunk)
                for where in (f"tracking_id IS NOT NULL AND tracking_id IN ({marks}) AND route = ?",
                              f"route = ? AND {STEM_SQL} IN ({marks})"):
                    args = [*chunk, route] if where.startswith("tracking_id") else [route, *chunk]
                    for row in self._db.execute(f"SELECT * FROM submissions WHERE {where} AND {in_states}",
                                                args + states):
                        found[row["id"]] = _row_to_sub(row)
        return sorted(found.values(), key=lambda sub: sub.id)

    # -- alerts ----------------------------------------------------------------------------
    def mark_alerted(self, sub_id: int, kind: str) -> bool:
        with self._tx() as db:
            cur = db.execute("INSERT OR IGNORE INTO alerts (submission_id, kind, sent_at) VALUES (?, ?, ?)",
                             (sub_id, kind, utcnow().isoformat()))
            return cur.rowcount == 1

    def unalerted(self, states: Iterable[State]) -> list[Submission]:
        names = [str(st) for st in states]
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM submissions s WHERE state IN ({', '.join('?' for _ in names)}) AND NOT EXISTS "
                "(SELECT 1 FROM alerts a WHERE a.submission_id = s.id AND a.kind = s.state) ORDER BY id",
                names).fetchall()
        return [_row_to_sub(r) for r in rows]

    # -- filing calendar -------------------------------------------------------------------
    def list_created(self, route: str, since: datetime, until: datetime) -> list[Submission]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM submissions WHERE route = ? AND created_at >= ? AND created_at < ? ORDER BY id",
                (route, _ts(since), _ts(until))).fetchall()
        return [_row_to_sub(r) for r in rows]

    def save_occurrence(self, occ: Occurrence) -> None:
        values = [getattr(occ, c) for c in _OCC_COLS]
        values = [_ts(v) if isinstance(v, datetime) else int(v) if isinstance(v, bool) else v for v in values]
        updates = ", ".join(f"{c} = excluded.{c}" for c in _OCC_COLS[2:])
        with self._tx() as db:
            # INSERT ... ON CONFLICT DO UPDATE: the same statement works on PostgreSQL.
            db.execute(f"INSERT INTO calendar_occurrences ({', '.join(_OCC_COLS)}) "
                       f"VALUES ({', '.join('?' for _ in _OCC_COLS)}) "
                       f"ON CONFLICT (expectation, deadline) DO UPDATE SET {updates}", values)

    def occurrences(self, expectation: str | None = None, since: datetime | None = None,
                    until: datetime | None = None, open_only: bool = False) -> list[Occurrence]:
        sql, args = "SELECT * FROM calendar_occurrences WHERE 1=1", []
        if expectation is not None:
            sql += " AND expectation = ?"
            args.append(expectation)
        if since is not None:
            sql += " AND deadline >= ?"
            args.append(_ts(since))
        if until is not None:
            sql += " AND deadline < ?"
            args.append(_ts(until))
        if open_only:
            sql += " AND closed = 0"
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY deadline, expectation", args).fetchall()
        return [_row_to_occ(r) for r in rows]

    def last_occurrence(self, expectation: str) -> Occurrence | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM calendar_occurrences WHERE expectation = ? "
                                   "ORDER BY deadline DESC LIMIT 1", (expectation,)).fetchone()
        return None if row is None else _row_to_occ(row)

    def calendar_alerts(self, expectation: str, deadline: datetime) -> dict[str, CalendarAlert]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM calendar_alerts WHERE expectation = ? AND deadline = ?",
                                    (expectation, _ts(deadline))).fetchall()
        return {r["kind"]: CalendarAlert(
            r["expectation"], datetime.fromisoformat(r["deadline"]), r["kind"],
            datetime.fromisoformat(r["first_sent_at"]), datetime.fromisoformat(r["last_sent_at"]), r["sent_count"],
            datetime.fromisoformat(r["cleared_at"]) if r["cleared_at"] else None) for r in rows}

    def record_calendar_alert(self, expectation: str, deadline: datetime, kind: str, at: datetime) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO calendar_alerts (expectation, deadline, kind, first_sent_at, last_sent_at, "
                       "sent_count, cleared_at) VALUES (?, ?, ?, ?, ?, 1, NULL) "
                       "ON CONFLICT (expectation, deadline, kind) DO UPDATE SET last_sent_at = excluded.last_sent_at, "
                       "sent_count = calendar_alerts.sent_count + 1, cleared_at = NULL",
                       (expectation, _ts(deadline), kind, _ts(at), _ts(at)))

    def clear_calendar_alert(self, expectation: str, deadline: datetime, kind: str, at: datetime) -> None:
        with self._tx() as db:
            db.execute("UPDATE calendar_alerts SET cleared_at = ? WHERE expectation = ? AND deadline = ? "
                       "AND kind = ? AND cleared_at IS NULL", (_ts(at), expectation, _ts(deadline), kind))

    def lock_instance(self, holder: str) -> bool:
        """An flock on ``JOURNAL.lock`` held until the process ends (the kernel drops it if the
        process dies, so a crash never leaves a stale lock); the holder is written into it."""
        import fcntl

        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            running = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise JournalLocked(f"the journal {self.path} is in use by a running agent ({running}); "
                                "one `filex-agent run` per data_dir (stop it first, or use another data_dir)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        self._instance_fd = fd
        return True

    # -- attempts, leases, fencing --------------------------------------------------------
    def begin_upload(self, sub_id: int, owner: str, lease_seconds: float, *, transport: str,
                     remote_name: str, upload_location: str) -> tuple[Submission, Attempt]:
        now = utcnow()
        with self._tx() as db:
            row = db.execute("SELECT state, owner, lease_until, epoch, attempts FROM submissions WHERE id = ?",
                             (sub_id,)).fetchone()
            if row is None:
                raise KeyError(f"no submission {sub_id}")
            if row["state"] != State.QUEUED.value:
                raise StateConflict(f"submission {sub_id} is {row['state']}, not QUEUED")
            if row["owner"] and row["lease_until"] and datetime.fromisoformat(row["lease_until"]) > now:
                raise StateConflict(f"submission {sub_id} is leased by {row['owner']}")
            if db.execute("SELECT 1 FROM attempts WHERE submission_id = ? AND outcome = ?",
                          (sub_id, Outcome.UNCONFIRMED.value)).fetchone():
                raise StateConflict(f"submission {sub_id} has an unconfirmed attempt")
            epoch = row["epoch"] + 1
            n = (db.execute("SELECT COALESCE(MAX(n), 0) FROM attempts WHERE submission_id = ?",
                            (sub_id,)).fetchone()[0]) + 1
            lease = (now + timedelta(seconds=lease_seconds)).isoformat()
            db.execute("UPDATE submissions SET state = ?, owner = ?, lease_until = ?, epoch = ?, attempts = ?, "
                       "upload_started_at = ?, next_attempt_at = NULL, transport = ?, updated_at = ? WHERE id = ?",
                       (State.UPLOADING.value, owner, lease, epoch, row["attempts"] + 1, now.isoformat(), transport,
                        now.isoformat(), sub_id))
            att_id = db.execute(
                "INSERT INTO attempts (submission_id, n, transport, remote_name, upload_location, owner, epoch, "
                "started_at, outcome) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (sub_id, n, transport, remote_name, upload_location, owner, epoch, now.isoformat(),
                 Outcome.PENDING.value)).lastrowid
            db.execute("INSERT INTO events (submission_id, at, state, detail) VALUES (?, ?, ?, ?)",
                       (sub_id, now.isoformat(), State.UPLOADING.value, f"upload attempt {n} over {transport} by {owner}"))
        return self.get(sub_id), self._attempt(att_id)

    def _attempt(self, attempt_id: int) -> Attempt:
        with self._lock:
            row = self._db.execute("SELECT * FROM attempts WHERE id = ?", (attempt_id,)).fetchone()
        if row is None:
            raise KeyError(f"no attempt {attempt_id}")
        return _row_to_attempt(row)

    def _fenced_attempt(self, db: sqlite3.Connection, attempt_id: int, epoch: int | None) -> sqlite3.Row:
        row = db.execute("SELECT a.submission_id, s.epoch FROM attempts a JOIN submissions s ON s.id = a.submission_id "
                         "WHERE a.id = ?", (attempt_id,)).fetchone()
        if row is None:
            raise KeyError(f"no attempt {attempt_id}")
        _fence(row["submission_id"], row["epoch"], epoch)
        return row

    def commit_attempt(self, attempt_id: int, epoch: int, tracking_id: str | None = None) -> Attempt:
        now = utcnow().isoformat()
        with self._tx() as db:
            row = self._fenced_attempt(db, attempt_id, epoch)
            db.execute("UPDATE attempts SET committed_at = COALESCE(committed_at, ?), "
                       "tracking_id = COALESCE(?, tracking_id) WHERE id = ?", (now, tracking_id, attempt_id))
            if tracking_id:
                db.execute("UPDATE submissions SET tracking_id = ?, updated_at = ? WHERE id = ?",
                           (tracking_id, now, row["submission_id"]))
        return self._attempt(attempt_id)

    def set_ticket(self, attempt_id: int, epoch: int, tracking_id: str) -> Attempt:
        now = utcnow().isoformat()
        with self._tx() as db:
            row = self._fenced_attempt(db, attempt_id, epoch)
            db.execute("UPDATE attempts SET tracking_id = ? WHERE id = ?", (tracking_id, attempt_id))
            db.execute("UPDATE submissions SET tracking_id = ?, updated_at = ? WHERE id = ?",
                       (tracking_id, now, row["submission_id"]))
        return self._attempt(attempt_id)

    def end_attempt(self, attempt_id: int, outcome: Outcome, detail: str | None = None, *,
                    epoch: int | None = None, decide_by: datetime | None = None) -> Attempt:
        with self._tx() as db:
            self._end_attempt_in(db, attempt_id, outcome, detail, epoch, decide_by, utcnow())
        return self._attempt(attempt_id)

    def _end_attempt_in(self, db: sqlite3.Connection, attempt_id: int, outcome: Outcome, detail: str | None,
                        epoch: int | None, decide_by: datetime | None, now: datetime) -> None:
        self._fenced_attempt(db, attempt_id, epoch)
        db.execute("UPDATE attempts SET outcome = ?, detail = COALESCE(?, detail), decide_by = ?, "
                   "ended_at = CASE WHEN ? = 'UNCONFIRMED' THEN ended_at ELSE ? END WHERE id = ?",
                   (outcome.value, None if detail is None else redact(detail),
                    decide_by.isoformat() if decide_by else None, outcome.value, now.isoformat(),
                    attempt_id))

    def attempts(self, sub_id: int) -> list[Attempt]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM attempts WHERE submission_id = ? ORDER BY n", (sub_id,)).fetchall()
        return [_row_to_attempt(r) for r in rows]

    def unconfirmed(self) -> list[Attempt]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM attempts WHERE outcome = ? ORDER BY id",
                                    (Outcome.UNCONFIRMED.value,)).fetchall()
        return [_row_to_attempt(r) for r in rows]

    def renew_leases(self, owner: str, lease_seconds: float) -> set[int]:
        now = utcnow()
        with self._tx() as db:
            db.execute("UPDATE submissions SET lease_until = ? WHERE owner = ? AND state = ? AND lease_until > ?",
                       ((now + timedelta(seconds=lease_seconds)).isoformat(), owner, State.UPLOADING.value,
                        now.isoformat()))
            rows = db.execute("SELECT id FROM submissions WHERE owner = ? AND state = ? AND lease_until > ?",
                              (owner, State.UPLOADING.value, now.isoformat())).fetchall()
        return {r[0] for r in rows}

    def expired_leases(self) -> list[Submission]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM submissions WHERE state = ? AND (lease_until IS NULL OR lease_until <= ?) ORDER BY id",
                (State.UPLOADING.value, utcnow().isoformat())).fetchall()
        return [_row_to_sub(r) for r in rows]

    def take_over(self, sub_id: int, owner: str, *, force: bool = False) -> Submission:
        now = utcnow()
        with self._tx() as db:
            row = db.execute("SELECT state, owner, lease_until, epoch FROM submissions WHERE id = ?",
                             (sub_id,)).fetchone()
            if row is None:
                raise KeyError(f"no submission {sub_id}")
            if row["state"] != State.UPLOADING.value:  # another rescuer settled it first
                raise StateConflict(f"submission {sub_id} is {row['state']}, not UPLOADING")
            live = row["lease_until"] and datetime.fromisoformat(row["lease_until"]) > now
            if live and not force and row["owner"] != owner:
                raise StateConflict(f"submission {sub_id} is leased by {row['owner']} until {row['lease_until']}")
            db.execute("UPDATE submissions SET owner = ?, lease_until = NULL, epoch = ?, updated_at = ? WHERE id = ?",
                       (owner, row["epoch"] + 1, now.isoformat(), sub_id))
        return self.get(sub_id)

    # -- cluster: one node, but the same bookkeeping (``filex-agent nodes`` shows it) ---------
    def schema_version(self) -> int:
        with self._lock:
            return self._db.execute("PRAGMA user_version").fetchone()[0]

    def try_lead(self, name: str, owner: str, lease_seconds: float) -> bool:
        now = utcnow()
        until = (now + timedelta(seconds=lease_seconds)).isoformat()
        with self._tx() as db:
            row = db.execute("SELECT owner, lease_until FROM leaders WHERE name = ?", (name,)).fetchone()
            if row is None:
                db.execute("INSERT INTO leaders (name, owner, lease_until) VALUES (?, ?, ?)", (name, owner, until))
                return True
            if row["owner"] != owner and datetime.fromisoformat(row["lease_until"]) > now:
                return False
            db.execute("UPDATE leaders SET owner = ?, lease_until = ?, epoch = epoch + ? WHERE name = ?",
                       (owner, until, 0 if row["owner"] == owner else 1, name))
            return True

    def resign(self, name: str, owner: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE leaders SET lease_until = ? WHERE name = ? AND owner = ?",
                       (utcnow().isoformat(), name, owner))

    def leaders(self) -> dict[str, Lead]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM leaders ORDER BY name").fetchall()
        return {r["name"]: Lead(r["name"], r["owner"], datetime.fromisoformat(r["lease_until"]), r["epoch"])
                for r in rows}

    def heartbeat_node(self, node: str, info: dict[str, Any]) -> None:
        now = utcnow().isoformat()
        with self._tx() as db:
            db.execute("INSERT INTO nodes (node, started_at, heartbeat_at, info) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT (node) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, info = excluded.info",
                       (node, now, now, json.dumps(info)))

    def nodes(self) -> list[NodeInfo]:
        now = utcnow().isoformat()
        out = []
        with self._lock:
            for r in self._db.execute("SELECT * FROM nodes ORDER BY node").fetchall():
                mine = {"node": r["node"], "now": now}
                holds = self._db.execute(f"SELECT COUNT(*) FROM submissions WHERE state = 'UPLOADING' AND {OWNED_BY}",
                                         mine).fetchone()[0]
                leads = self._db.execute(f"SELECT name FROM leaders WHERE lease_until > :now AND {OWNED_BY} "
                                         "ORDER BY name", mine).fetchall()
                out.append(NodeInfo(r["node"], datetime.fromisoformat(r["started_at"]),
                                    datetime.fromisoformat(r["heartbeat_at"]), json.loads(r["info"]), holds,
                                    [x[0] for x in leads]))
        return out

    def close(self) -> None:
        with self._reader_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
        with self._lock:
            self._db.close()
        fd = getattr(self, "_instance_fd", None)
        if fd is not None:
            self._instance_fd = None
            os.close(fd)  # releases the instance lock


def _fence(sub_id: int, current: int | None, epoch: int | None) -> None:
    if epoch is not None and current is not None and current != epoch:
        raise StaleEpoch(f"submission {sub_id} was taken over (epoch {current}, writer had {epoch}); "
                         "the writer must abandon its work")


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT under the store lock (rollback on error)."""

    def __init__(self, store: SQLiteStore):
        self.store = store

    def __enter__(self) -> sqlite3.Connection:
        self.store._lock.acquire()
        self.store._db.execute("BEGIN IMMEDIATE")
        return self.store._db

    def __exit__(self, exc_type, exc, tb) -> None:
        ticket = None
        try:
            if exc_type:
                self.store._db.execute("ROLLBACK")
            else:
                self.store._db.execute("COMMIT")
                ticket = self.store._group.written()  # under the lock: tickets in commit order
        finally:
            self.store._lock.release()
        if ticket is not None:
            # Outside the lock: other threads commit meanwhile and share the next fsync.
            self.store._group.wait(ticket)
        if exc_type is sqlite3.IntegrityError and "UNIQUE" in str(exc):
            raise Duplicate(str(exc)) from exc
