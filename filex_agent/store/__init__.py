"""The journal: the single source of truth for every submission's state.

``Store`` is the small interface the daemon talks to; ``SQLiteStore`` is the embedded default.
Every state change is written (and fsynced by SQLite, synchronous=FULL) before the action it
allows, with an event row, so that recovery can rebuild everything else from it.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable


class State(str, enum.Enum):
    CLAIMING = "CLAIMING"  # row written, atomic rename out of the outbox not yet confirmed
    QUEUED = "QUEUED"  # claimed, waiting for (another) upload attempt
    HELD = "HELD"  # same content already pending/accepted: waits for `release`
    UPLOADING = "UPLOADING"  # a worker owns it (lease) and is sending it
    UNCONFIRMED = "UNCONFIRMED"  # bytes may have reached fileX, answer unknown: the reconciler decides
    SUBMITTED = "SUBMITTED"  # fileX has the bytes; waiting for a final tracking status
    ACCEPTED = "ACCEPTED"
    REJECTED = "REJECTED"
    PARTIALLY_REJECTED = "PARTIALLY_REJECTED"
    FAILED = "FAILED"  # never uploaded (bad name, empty, too large, refused...)

    def __str__(self) -> str:
        return self.value


FINAL_STATES = frozenset({State.ACCEPTED, State.REJECTED, State.PARTIALLY_REJECTED, State.FAILED})
PENDING_STATES = frozenset({State.CLAIMING, State.QUEUED, State.UPLOADING, State.UNCONFIRMED, State.SUBMITTED})


class Outcome(str, enum.Enum):
    """What became of one upload attempt."""

    PENDING = "PENDING"  # under way: its owner holds the submission's lease
    SENT = "SENT"  # fileX has the bytes of this attempt
    NOT_SENT = "NOT_SENT"  # nothing of this attempt can become a filing at fileX
    UNCONFIRMED = "UNCONFIRMED"  # bytes may have left, the answer is unknown (lost response, crash, stop)

    def __str__(self) -> str:
        return self.value


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class Submission:
    id: int
    route: str
    org: str
    application: str
    transport: str
    file_name: str
    source_path: str
    local_path: str
    state: State
    size: int | None = None
    mtime_ns: int | None = None
    sha256: str | None = None
    reason: str | None = None
    tracking_id: str | None = None
    upload_location: str | None = None
    remote_status: str | None = None
    downstream_status: str | None = None
    move_to: str | None = None
    attempts: int = 0
    next_attempt_at: datetime | None = None
    created_at: datetime = field(default_factory=utcnow)
    updated_at: datetime = field(default_factory=utcnow)
    upload_started_at: datetime | None = None
    uploaded_at: datetime | None = None
    final_at: datetime | None = None
    held_by: int | None = None
    flag: str | None = None  # an operator-visible warning (no tracking match, outage...)
    # Ownership while UPLOADING: who sends it, until when (renewed by heartbeat), and the fencing
    # epoch, raised by every take-over: a write carrying an older epoch is refused (StaleEpoch).
    owner: str | None = None
    lease_until: datetime | None = None
    epoch: int = 0

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES


@dataclass
class Event:
    submission_id: int
    at: datetime
    state: str
    detail: str | None


@dataclass
class Attempt:
    """One upload attempt, journaled before its first byte. Decides whether a re-send is safe."""

    id: int
    submission_id: int
    n: int  # 1, 2, ... per submission
    transport: str
    remote_name: str
    upload_location: str  # "org/app/in"
    owner: str
    epoch: int
    started_at: datetime
    outcome: Outcome = Outcome.PENDING
    # Set (write-ahead) just before the request that can make the file a filing at fileX: the
    # PUT of the body, PutObject/CompleteMultipartUpload, the SFTP rename into place.
    committed_at: datetime | None = None
    tracking_id: str | None = None
    ended_at: datetime | None = None
    detail: str | None = None
    # UNCONFIRMED: when the reconciler stops waiting for evidence and sends the file again.
    decide_by: datetime | None = None

    @property
    def may_have_landed(self) -> bool:
        return self.committed_at is not None


@dataclass
class FeedbackFile:
    id: int
    route: str
    remote_name: str
    remote_size: int | None
    remote_modified: str | None
    local_path: str | None
    submission_id: int | None
    downloaded_at: datetime | None


class Store(abc.ABC):
    """What the daemon needs from a journal. Implementations must be thread-safe."""

    @abc.abstractmethod
    def create(self, **fields: Any) -> Submission: ...

    @abc.abstractmethod
    def get(self, sub_id: int) -> Submission: ...

    @abc.abstractmethod
    def list(self, states: Iterable[State] | None = None, route: str | None = None) -> list[Submission]: ...

    @abc.abstractmethod
    def count(self, states: Iterable[State], route: str | None = None) -> dict[str, int]:
        """Submissions in ``states`` per route (``route``'s only, when given); routes with none are
        absent. A count in the journal, not a listing: it must stay cheap with 100,000 rows."""

    @abc.abstractmethod
    def due(self, now: datetime, limit: int) -> list[int]:
        """Ids of QUEUED submissions whose next attempt is due, oldest first, at most ``limit``."""

    @abc.abstractmethod
    def transition(self, sub_id: int, state: State, detail: str | None = None, *,
                   expect: Iterable[State] | None = None, epoch: int | None = None, **fields: Any) -> Submission:
        """Set state (+fields) and append an event, atomically. With ``expect``, only if the
        current state is one of those (else ``StateConflict``); with ``epoch``, only if the
        submission's fencing epoch is still that one (else ``StaleEpoch``)."""

    @abc.abstractmethod
    def update(self, sub_id: int, *, epoch: int | None = None, **fields: Any) -> Submission:
        """Change fields without a state change (no event); fenced like ``transition``."""

    @abc.abstractmethod
    def events(self, sub_id: int) -> list[Event]: ...

    @abc.abstractmethod
    def by_tracking_id(self, tracking_id: str) -> Submission | None:
        """The submission that owns ``tracking_id`` (unique), if any."""

    @abc.abstractmethod
    def find_same_content(self, org: str, application: str, sha256: str, exclude_id: int) -> Submission | None:
        """An earlier submission of the same bytes that is pending or ACCEPTED."""

    @abc.abstractmethod
    def feedback_seen(self, route: str, remote_name: str, remote_size: int | None,
                      remote_modified: str | None) -> bool: ...

    @abc.abstractmethod
    def record_feedback(self, route: str, remote_name: str, remote_size: int | None,
                        remote_modified: str | None, local_path: str | None,
                        submission_id: int | None) -> FeedbackFile: ...

    @abc.abstractmethod
    def feedback_for(self, sub_id: int) -> list[FeedbackFile]: ...

    @abc.abstractmethod
    def feedback_keys(self, route: str) -> tuple[set[FeedbackKey], set[FeedbackKey]]:
        """(filed, in doubt) keys ``(remote_name, remote_size, remote_modified)`` of a route, in one
        query: a listing of 100,000 files must not cost 100,000 lookups. "In doubt": a download
        was begun (``begin_feedback``) and never confirmed — a crash may have left it filed."""

    @abc.abstractmethod
    def begin_feedback(self, route: str, remote_name: str, remote_size: int | None,
                       remote_modified: str | None) -> None:
        """Write-ahead: a download of this remote file is about to start."""

    def lock_instance(self, holder: str) -> bool:
        """For ``run``: make this process the journal's only daemon, if the journal needs that.
        True when it is exclusive now (every other daemon owner in it is dead); False for a
        journal shared by several agents. Raises ``JournalLocked`` naming the running holder."""
        return False

    # -- attempts, leases, fencing --------------------------------------------------------
    def now(self) -> datetime:
        """The journal's clock: every lease is reckoned by it (PostgreSQL: the server's)."""
        return utcnow()

    @abc.abstractmethod
    def begin_upload(self, sub_id: int, owner: str, lease_seconds: float, *, transport: str,
                     remote_name: str, upload_location: str) -> tuple[Submission, Attempt]:
        """Atomically: QUEUED → UPLOADING, owner and lease set, epoch raised by one, a PENDING
        attempt row written. ``StateConflict`` if the row is not QUEUED, its lease is held, or it
        has an UNCONFIRMED attempt (a submission with one is never sent again until decided)."""

    @abc.abstractmethod
    def commit_attempt(self, attempt_id: int, epoch: int, tracking_id: str | None = None) -> Attempt:
        """Write-ahead, fenced: the request that can make the file a filing is about to go out.
        ``tracking_id`` (REST) is stored on the attempt and the submission. ``StaleEpoch`` if the
        submission has been taken over since."""

    @abc.abstractmethod
    def set_ticket(self, attempt_id: int, epoch: int, tracking_id: str) -> Attempt:
        """Fenced: fileX handed out ``tracking_id`` for this attempt (before any byte is sent)."""

    @abc.abstractmethod
    def end_attempt(self, attempt_id: int, outcome: Outcome, detail: str | None = None, *,
                    epoch: int | None = None, decide_by: datetime | None = None) -> Attempt:
        """Record an attempt's outcome (fenced when ``epoch`` is given)."""

    @abc.abstractmethod
    def attempts(self, sub_id: int) -> list[Attempt]:
        """A submission's attempts, oldest first."""

    @abc.abstractmethod
    def unconfirmed(self) -> list[Attempt]:
        """Every UNCONFIRMED attempt (the reconciler's work list), oldest first."""

    @abc.abstractmethod
    def renew_leases(self, owner: str, lease_seconds: float) -> set[int]:
        """Heartbeat: extend every lease ``owner`` holds; the ids it still holds."""

    @abc.abstractmethod
    def expired_leases(self) -> list[Submission]:
        """UPLOADING submissions whose lease has run out (their owner died or stalled)."""

    @abc.abstractmethod
    def take_over(self, sub_id: int, owner: str, *, force: bool = False) -> Submission:
        """Rescuer: take a row whose lease expired: epoch raised, owner set, lease cleared, so the
        old owner's later writes are refused. ``StateConflict`` if another owner's lease is still
        live, unless ``force`` (the caller knows that owner is dead: it held the instance lock)."""

    @abc.abstractmethod
    def close(self) -> None: ...


FeedbackKey = tuple[str, "int | None", "str | None"]


class StateConflict(Exception):
    """The submission was not in an expected state (someone else moved it on)."""


class JournalLocked(Exception):
    """Another ``filex-agent run`` holds this journal."""


class StaleEpoch(StateConflict):
    """A write carried a fencing epoch older than the submission's: its lease was taken over, so
    the writer must abandon what it was doing (upload nothing more, move nothing)."""


def open_store(path: Path) -> Store:
    from filex_agent.store.sqlite import SQLiteStore

    return SQLiteStore(path)
