"""SQLite journal (WAL, synchronous=FULL): the embedded default store."""

from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import fields as dc_fields
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Iterable

from filex_agent.store import (
    Attempt,
    Event,
    JournalLocked,
    Outcome,
    StaleEpoch,
    FeedbackFile,
    State,
    StateConflict,
    Store,
    Submission,
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
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    submission_id INTEGER NOT NULL REFERENCES submissions(id),
    n INTEGER NOT NULL, transport TEXT NOT NULL, remote_name TEXT NOT NULL, upload_location TEXT NOT NULL,
    owner TEXT NOT NULL, epoch INTEGER NOT NULL, started_at TEXT NOT NULL, outcome TEXT NOT NULL,
    committed_at TEXT, tracking_id TEXT, ended_at TEXT, detail TEXT, decide_by TEXT,
    UNIQUE(submission_id, n)
);
CREATE INDEX IF NOT EXISTS attempts_outcome ON attempts(outcome);
"""

# Columns added after the first release: (table, column, declaration). Added to an older journal
# at open; ``user_version`` records the schema version reached.
SCHEMA_VERSION = 2
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


def _enc(key: str, value: Any) -> Any:
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


class SQLiteStore(Store):
    def __init__(self, path: Path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # One connection guarded by a lock: writes are small and serialised anyway.
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a state change is on disk before the action it allows.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()

    def _migrate(self) -> None:
        have = {r[1] for r in self._db.execute("PRAGMA table_info(submissions)")}
        if have:  # an older journal: add what later versions added before the indexes use it
            for table, col, decl in _ADDED_COLUMNS:
                if col not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {col} {decl}")
        self._db.executescript(SCHEMA)
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
        self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # -- helpers -------------------------------------------------------------------------
    def _tx(self):
        return _Tx(self)

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
            row = db.execute("SELECT state, epoch FROM submissions WHERE id = ?", (sub_id,)).fetchone()
            if row is None:
                raise KeyError(f"no submission {sub_id}")
            _fence(sub_id, row["epoch"], epoch)
            if expect is not None and row["state"] not in {str(s) for s in expect}:
                raise StateConflict(f"submission {sub_id} is {row['state']}, expected one of {sorted(map(str, expect))}")
            sets = ", ".join(f"{k} = ?" for k in fields)
            db.execute(f"UPDATE submissions SET {sets} WHERE id = ?", [_enc(k, v) for k, v in fields.items()] + [sub_id])
            db.execute("INSERT INTO events (submission_id, at, state, detail) VALUES (?, ?, ?, ?)",
                       (sub_id, now.isoformat(), str(state), detail))
        return self.get(sub_id)

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

    def by_tracking_id(self, tracking_id: str) -> Submission | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM submissions WHERE tracking_id = ?", (tracking_id,)).fetchone()
        return None if row is None else _row_to_sub(row)

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
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM feedback WHERE route = ? AND remote_name = ? AND remote_size IS ? "
                "AND remote_modified IS ? AND downloaded_at IS NOT NULL",
                (route, remote_name, remote_size, remote_modified)).fetchone()
        return row is not None

    def feedback_keys(self, route: str) -> tuple[set, set]:
        filed: set = set()
        doubt: set = set()
        with self._lock:
            rows = self._db.execute(
                "SELECT remote_name, remote_size, remote_modified, downloaded_at FROM feedback WHERE route = ?",
                (route,)).fetchall()
        for r in rows:
            (filed if r[3] is not None else doubt).add((r[0], r[1], r[2]))
        return filed, doubt

    def begin_feedback(self, route: str, remote_name: str, remote_size: int | None,
                       remote_modified: str | None) -> None:
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
        now = utcnow().isoformat()
        with self._tx() as db:
            row = db.execute(
                "SELECT id, downloaded_at FROM feedback WHERE route = ? AND remote_name = ? AND remote_size IS ? "
                "AND remote_modified IS ?", (route, remote_name, remote_size, remote_modified)).fetchone()
            if row is not None and row[1] is not None:
                # Filed already: a second record would mean a second copy (the invariant is "once").
                raise sqlite3.IntegrityError(f"feedback {remote_name!r} of route {route} is recorded already")
            if row is None:
                fid = db.execute(
                    "INSERT INTO feedback (route, remote_name, remote_size, remote_modified, local_path, submission_id, "
                    "downloaded_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (route, remote_name, remote_size, remote_modified, local_path, submission_id, now)).lastrowid
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
        now = utcnow().isoformat()
        with self._tx() as db:
            self._fenced_attempt(db, attempt_id, epoch)
            db.execute("UPDATE attempts SET outcome = ?, detail = COALESCE(?, detail), decide_by = ?, "
                       "ended_at = CASE WHEN ? = 'UNCONFIRMED' THEN ended_at ELSE ? END WHERE id = ?",
                       (outcome.value, detail, decide_by.isoformat() if decide_by else None, outcome.value, now,
                        attempt_id))
        return self._attempt(attempt_id)

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
            live = row["lease_until"] and datetime.fromisoformat(row["lease_until"]) > now
            if live and not force and row["owner"] != owner:
                raise StateConflict(f"submission {sub_id} is leased by {row['owner']} until {row['lease_until']}")
            db.execute("UPDATE submissions SET owner = ?, lease_until = NULL, epoch = ?, updated_at = ? WHERE id = ?",
                       (owner, row["epoch"] + 1, now.isoformat(), sub_id))
        return self.get(sub_id)

    def close(self) -> None:
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
        try:
            self.store._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.store._lock.release()
