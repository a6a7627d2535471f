"""Append-only, hash-chained audit trail (JSON lines).

Every line is one JSON object ending with two chain fields:

* ``prev``: SHA-256 (hex) of the previous line's exact bytes (without its newline); ``"0"*64``
  on the first line. A deleted, inserted or reordered line breaks the chain at the next line.
* ``hash``: SHA-256 (hex) of this line's bytes up to (not including) ``,"hash":``. An edited
  line is named by its own number, and an edit of the *last* line is detected too.

The chain proves integrity against accidents and naive edits, not against someone who rewrites
the whole file (there is no key): keep ``head`` (hash of the last line) elsewhere, e.g. in the
journal, and compare, if that matters. Deleting trailing lines is only visible that way.

Several processes may append (daemon and CLI): appends hold an ``flock`` and read the chain
head from the file itself, so they never fork the chain.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filex_agent.fsutil import GroupSync
from filex_agent.logging_setup import redact_value

log = logging.getLogger(__name__)

GENESIS = "0" * 64
RESERVED = frozenset({"time", "event", "prev", "hash"})
_HASH_SUFFIX = re.compile(rb',"hash":"([0-9a-f]{64})"\}$')
_TAIL_CHUNK = 8192


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    lines: int
    first_bad_line: int | None = None
    problem: str | None = None


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _encode(record: dict[str, Any]) -> bytes:
    # Compact and deterministic; default=str so Paths, datetimes and enums serialise.
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8")


class AuditLog:
    """Thread-safe appender and verifier of one audit file."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        created_dir = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existed = self.path.exists()
        # O_APPEND: every write lands at the end, whatever another writer did; never truncates.
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        if not existed or created_dir:
            _fsync_dir(self.path.parent)
        self._lock = threading.Lock()
        self._closed = False
        self._group = GroupSync(lambda: os.fsync(self._fd))

    @classmethod
    def open_readonly(cls, path: Path | str) -> "AuditLog":
        """For verify() and read() only: an auditor may have read access and nothing more."""
        self = cls.__new__(cls)
        self.path = Path(path)
        self._fd = -1
        self._lock = threading.Lock()
        self._closed = True  # append() refuses
        return self

    # -- writing ---------------------------------------------------------------------------

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event; returns the record as written (with time, prev and hash)."""
        return self.append_many([(event, fields)])[0]

    def append_many(self, events: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        """Append several events as one write, durable when this returns (one fsync, shared with
        the appends of other threads made meanwhile: group commit)."""
        records, ticket = self.write_many(events)
        self.wait(ticket)
        return records

    def wait(self, ticket: int) -> None:
        """Return once the write that got ``ticket`` is on disk."""
        self._group.wait(ticket)

    def write_many(self, events: list[tuple[str, dict[str, Any]]]) -> tuple[list[dict[str, Any]], int]:
        """Append several events as one write, not yet durable: ``wait(ticket)`` makes it so."""
        for _, fields in events:
            bad = RESERVED.intersection(fields)
            if bad:
                raise ValueError(f"reserved audit field(s): {', '.join(sorted(bad))}")
        records: list[dict[str, Any]] = []
        with self._lock:
            if self._closed:
                raise ValueError("audit log is closed")
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                prev, needs_newline = self._tail()
                lines = []
                scrubbed: dict[str, Any] = {}  # a batch repeats routes, states, names: scrub each once

                def scrub(v: Any) -> Any:
                    if not isinstance(v, str):
                        return redact_value(v)
                    if v not in scrubbed:
                        scrubbed[v] = redact_value(v)
                    return scrubbed[v]

                for event, fields in events:
                    record: dict[str, Any] = {
                        "time": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                        "event": event,
                        # Reasons and details carry exception text: scrubbed like a log line.
                        **{k: scrub(v) for k, v in fields.items()},
                        "prev": prev,
                    }
                    body = _encode(record)[:-1]  # without the closing brace
                    digest = _sha(body)
                    line = body + b',"hash":"' + digest.encode() + b'"}'
                    prev = _sha(line)
                    record["hash"] = digest
                    records.append(record)
                    lines.append(line)
                data = b"\n".join(lines) + b"\n"
                if needs_newline:
                    # A crash left a partial last line. Keep it (verify() reports it), end it so
                    # this record stays a line of its own, and chain over it as written.
                    log.error("audit log %s ends with a partial line; it is kept and reported by verify",
                              self.path)
                    data = b"\n" + data
                _write_all(self._fd, data)
                ticket = self._group.written()  # under the flock: in file order
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        return records, ticket

    def _tail(self) -> tuple[str, bool]:
        """(hash of the last line, True if the file does not end with a newline)."""
        size = os.fstat(self._fd).st_size
        if size == 0:
            return GENESIS, False
        last_byte = os.pread(self._fd, 1, size - 1)
        partial = last_byte != b"\n"
        end = size if partial else size - 1
        # Read backwards until the newline that starts the last line.
        pos, buf = end, b""
        while pos > 0:
            n = min(_TAIL_CHUNK, pos)
            pos -= n
            buf = os.pread(self._fd, n, pos) + buf
            i = buf.rfind(b"\n")
            if i >= 0:
                return _sha(buf[i + 1:]), partial
        return _sha(buf), partial

    @property
    def head(self) -> str:
        """Hash of the last line (what the next ``prev`` will be)."""
        with self._lock:
            return self._tail()[0]

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._fd)

    def __enter__(self) -> "AuditLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------------------

    def verify(self) -> VerifyResult:
        """Check every line; report the first broken one (1-based)."""
        expected_prev = GENESIS
        n = 0
        with open(self.path, "rb") as f:
            # Shared lock: never judge a line an appender is still writing.
            fcntl.flock(f.fileno(), fcntl.LOCK_SH)
            for raw in f:
                n += 1
                if not raw.endswith(b"\n"):
                    return VerifyResult(False, n, n, "truncated line (no newline): an interrupted write?")
                line = raw[:-1]
                try:
                    obj = json.loads(line)
                except (ValueError, UnicodeDecodeError):
                    return VerifyResult(False, n, n, "not valid JSON (truncated or edited)")
                if not isinstance(obj, dict):
                    return VerifyResult(False, n, n, "not a JSON object")
                m = _HASH_SUFFIX.search(line)
                if m is None or obj.get("hash") != m.group(1).decode():
                    return VerifyResult(False, n, n, "missing or malformed hash field")
                if _sha(line[:m.start()]) != m.group(1).decode():
                    return VerifyResult(False, n, n, "line content does not match its hash (edited)")
                if obj.get("prev") != expected_prev:
                    what = "first line must chain from the genesis value" if n == 1 else \
                        "prev does not match the line before (a line was deleted, inserted or reordered)"
                    return VerifyResult(False, n, n, what)
                expected_prev = _sha(line)
        return VerifyResult(True, n)

    def read(self, since: datetime | None = None) -> Iterator[dict[str, Any]]:
        """Records in file order, optionally only those at or after ``since``.

        Unreadable lines are skipped with a warning: use verify() to judge integrity.
        """
        if since is not None and since.tzinfo is None:
            since = since.replace(tzinfo=timezone.utc)  # naive means UTC, like the file
        with open(self.path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    obj = json.loads(raw)
                except (ValueError, UnicodeDecodeError):
                    log.warning("audit log %s line %d is not valid JSON; skipped", self.path, n)
                    continue
                if since is not None:
                    try:
                        when = datetime.fromisoformat(obj["time"])
                    except (KeyError, TypeError, ValueError):
                        continue
                    if when < since:
                        continue
                yield obj


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(path: Path) -> None:
    try:
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
