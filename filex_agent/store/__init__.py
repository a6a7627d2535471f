"""The journal: the single source of truth for every submission's state.

``Store`` is the small interface the daemon talks to; ``SQLiteStore`` is the embedded default,
``PostgresStore`` the shared journal of several agents (high availability). Every state change is
written (and made durable) before the action it allows, with an event row, so that recovery can
rebuild everything else from it.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from filex_agent.errors import FilexError, TransientError

# The journal's schema version, the same number for every backend (SQLite: ``PRAGMA user_version``;
# PostgreSQL: the ``schema_version`` table). A journal newer than this build refuses to open.
SCHEMA_VERSION = 3

# SQL (named parameter ``:node``): the row's ``owner`` is ``node`` itself or one of its workers'
# owner strings "node:pid:nonce" (the daemon's).
OWNED_BY = "(owner = :node OR substr(owner, 1, length(CAST(:node AS TEXT)) + 1) = :node || ':')"


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
# fileX has (UNCONFIRMED: may have) the bytes: the only submissions a feedback file can belong
# to. UNCONFIRMED too: fileX's feedback can come before the reconciler has seen the upload in
# tracking (an owner killed or paused after its PUT), and the feedback then proves it landed.
REACHED_STATES = frozenset({State.UNCONFIRMED, State.SUBMITTED, State.ACCEPTED, State.REJECTED,
                            State.PARTIALLY_REJECTED})


class Outcome(str, enum.Enum):
    """What became of one upload attempt."""

    PENDING = "PENDING"  # under way: its owner holds the submission's lease
    SENT = "SENT"  # fileX has the bytes of this attempt
    NOT_SENT = "NOT_SENT"  # nothing of this attempt can become a filing at fileX
    UNCONFIRMED = "UNCONFIRMED"  # bytes may have left, the answer is unknown (lost response, crash, stop)

    def __str__(self) -> str:
        return self.value


def open_state_names() -> tuple[str, ...]:
    """Every state that is not final, by name (states added to ``State`` later included): the
    read-only views select them with ``IN (...)``, which an index serves (``NOT IN`` would not)."""
    return tuple(s.value for s in State if s not in FINAL_STATES)


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


@dataclass
class Lead:
    """Who runs a singleton (tracking polls, feedback collection, alert sweeps...) until when."""

    name: str
    owner: str
    lease_until: datetime
    epoch: int  # raised whenever the lead passes to another owner


@dataclass
class NodeInfo:
    """One agent of the cluster, as its heartbeats left it in the journal."""

    node: str
    started_at: datetime
    heartbeat_at: datetime
    info: dict[str, Any]
    holds: int = 0  # UPLOADING submissions leased by one of this node's owners ("node:pid:nonce")
    leads: list[str] = field(default_factory=list)


@dataclass
class Occurrence:
    """One due filing of a calendar expectation (filex_agent/filing_calendar.py).

    Keyed by (expectation, deadline). A matching file claimed on ``route`` in
    [``opens_at``, ``closes_at``) counts for it; ``closed`` once nothing can change it any more.
    """

    expectation: str
    deadline: datetime  # UTC
    opens_at: datetime
    closes_at: datetime
    route: str
    pattern: str
    label: str  # the period in local terms: "2026-11-25", "2026-Q1", ...
    state: str  # EXPECTED, DROPPED, SUBMITTED, ACCEPTED, REJECTED, PARTIALLY_REJECTED, MISSED
    on_time: bool | None = None  # ACCEPTED: uploaded at or before the deadline
    submission_id: int | None = None  # the submission that satisfied it (or the latest one seen)
    verdict: str | None = None  # that submission's state
    early_close: bool = False
    closed: bool = False
    updated_at: datetime = field(default_factory=utcnow)


@dataclass
class CalendarAlert:
    """The last time a calendar alert kind was sent for one occurrence (restart-proof dedupe)."""

    expectation: str
    deadline: datetime
    kind: str
    first_sent_at: datetime
    last_sent_at: datetime
    sent_count: int
    cleared_at: datetime | None = None


@dataclass(frozen=True)
class Transition:
    """One step of ``Store.transition_many``."""

    sub_id: int
    state: "State"
    detail: str | None = None
    expect: frozenset["State"] | None = None
    fields: dict[str, Any] = field(default_factory=dict)


class Store(abc.ABC):
    """What the daemon needs from a journal. Implementations must be thread-safe."""

    # Several agents (processes, machines) may use this journal at once: singletons need a leader.
    shared = False

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
    def create_claims(self, fields: dict[str, Any], files: Sequence[tuple[str, str]],
                      local_path_of: Callable[[int, str], str]) -> list[Submission | None]:
        """One CLAIMING row per ``(file_name, source_path)`` with ``fields`` in common, all in one
        transaction (one fsync for a whole outbox scan); each row's ``local_path`` is
        ``local_path_of(id, file_name)``, journaled before the rename it announces. ``None`` in
        place of a file another agent is claiming already (``create`` would raise ``Duplicate``)."""

    def settle(self, attempt_id: int, outcome: Outcome, detail: str | None, step: "Transition", *, epoch: int,
               decide_by: datetime | None = None) -> Submission:
        """``end_attempt`` and the ``transition`` it leads to, fenced by ``epoch``: one write where
        the store can (two here, safe in this order: recovery finishes the second)."""
        self.end_attempt(attempt_id, outcome, detail, epoch=epoch, decide_by=decide_by)
        return self.transition(step.sub_id, step.state, step.detail, expect=step.expect, epoch=epoch, **step.fields)

    @abc.abstractmethod
    def transition_many(self, steps: Sequence["Transition"]) -> list["Submission | StateConflict"]:
        """Several ``transition`` calls in one transaction, in order (unfenced): the row as each
        step left it. A step whose ``expect`` does not hold is skipped and its ``StateConflict``
        returned in its place."""

    @abc.abstractmethod
    def events(self, sub_id: int) -> list[Event]: ...

    def get_many(self, sub_ids: Sequence[int]) -> dict[int, Submission]:
        """``get`` of several submissions (one query where the store can); missing ids are absent."""
        out = {}
        for i in sub_ids:
            try:
                out[i] = self.get(i)
            except KeyError:
                pass
        return out

    def events_many(self, sub_ids: Sequence[int]) -> dict[int, list[Event]]:
        """``events`` of several submissions (one query where the store can)."""
        return {i: self.events(i) for i in sub_ids}

    @abc.abstractmethod
    def by_tracking_id(self, tracking_id: str) -> Submission | None:
        """The submission that owns ``tracking_id`` (unique), if any."""

    @abc.abstractmethod
    def discard_claim(self, sub_id: int) -> bool:
        """A claim race lost to another agent: delete this CLAIMING row (and its event) when
        another submission of the same ``source_path``, not FAILED, was created in the hour
        before it — the file left the outbox in the other agent's claim, so this row never held
        anything. False (nothing deleted) otherwise: the file really vanished."""

    @abc.abstractmethod
    def find_same_content(self, org: str, application: str, sha256: str, exclude_id: int) -> Submission | None:
        """An earlier submission of the same bytes that is pending or ACCEPTED."""

    # The feedback once-only key is (route, remote_name, remote_size, remote_modified), with
    # remote_modified normalised by ``feedback_instant`` on the way in and out (implementations
    # must do both, so rows written before the normalisation still match).
    @abc.abstractmethod
    def feedback_seen(self, route: str, remote_name: str, remote_size: int | None,
                      remote_modified: str | None) -> bool: ...

    @abc.abstractmethod
    def record_feedback(self, route: str, remote_name: str, remote_size: int | None,
                        remote_modified: str | None, local_path: str | None,
                        submission_id: int | None) -> FeedbackFile:
        """Confirm a download (completing a ``begin_feedback`` row if there is one);
        ``FeedbackAlreadyFiled`` if that remote file is recorded as filed already."""

    @abc.abstractmethod
    def feedback_for(self, sub_id: int) -> list[FeedbackFile]: ...

    @abc.abstractmethod
    def feedback_candidates(self, route: str, parts: Iterable[str]) -> list[Submission]:
        """Submissions of ``route`` that reached fileX (``REACHED_STATES``) whose tracking id or
        file stem (the name without its last extension) is one of ``parts``: an indexed lookup,
        whatever the size of the history."""

    @abc.abstractmethod
    def feedback_keys(self, route: str, names: Iterable[str] | None = None) -> tuple[set[FeedbackKey], set[FeedbackKey]]:
        """(filed, in doubt) keys ``(remote_name, remote_size, remote_modified)`` of a route, of the
        files named ``names`` (all of the route's when None), in a few queries: a listing of
        100,000 files must not cost 100,000 lookups, nor a cycle read years of feedback. "In
        doubt": a download was begun (``begin_feedback``) and never confirmed — a crash may have
        left it filed."""

    @abc.abstractmethod
    def route_has_history(self, route: str) -> bool:
        """Whether ``route`` has any submission or feedback row (two indexed probes, not a count)."""

    @abc.abstractmethod
    def pending_moves(self) -> list[Submission]:
        """Submissions whose local move (``move_to``) is journaled but not done, oldest first:
        an indexed lookup, whatever the size of the history (recovery at start-up)."""

    @abc.abstractmethod
    def last_upload(self, route: str) -> datetime | None:
        """The latest ``uploaded_at`` of ``route`` (an index lookup), or None."""

    @abc.abstractmethod
    def begin_feedback(self, route: str, remote_name: str, remote_size: int | None,
                       remote_modified: str | None) -> None:
        """Write-ahead: a download of this remote file is about to start."""

    # -- alerts ----------------------------------------------------------------------------
    @abc.abstractmethod
    def mark_alerted(self, sub_id: int, kind: str) -> bool:
        """Journal that the ``kind`` alert of a submission is being sent (before it is handed to
        the notifier); False if it was already: each such alert goes out once, across restarts."""

    @abc.abstractmethod
    def unalerted(self, states: Iterable[State]) -> list[Submission]:
        """Submissions in ``states`` whose alert of that state has not been sent (a restart came
        while it waited for feedback). Rows final before the journal knew alerts count as sent."""

    # -- filing calendar -------------------------------------------------------------------
    @abc.abstractmethod
    def list_created(self, route: str, since: datetime, until: datetime) -> list[Submission]:
        """Submissions of ``route`` claimed (``created_at``) in [since, until), oldest first."""

    @abc.abstractmethod
    def save_occurrence(self, occ: Occurrence) -> None:
        """Insert or replace the occurrence keyed by (expectation, deadline)."""

    @abc.abstractmethod
    def occurrences(self, expectation: str | None = None, since: datetime | None = None,
                    until: datetime | None = None, open_only: bool = False) -> list[Occurrence]:
        """Occurrences with ``since <= deadline < until`` (each bound optional), by deadline;
        ``open_only``: those not ``closed``."""

    @abc.abstractmethod
    def last_occurrence(self, expectation: str) -> Occurrence | None:
        """The occurrence of ``expectation`` with the latest deadline."""

    @abc.abstractmethod
    def calendar_alerts(self, expectation: str, deadline: datetime) -> dict[str, CalendarAlert]:
        """Alerts recorded for one occurrence, by kind."""

    @abc.abstractmethod
    def record_calendar_alert(self, expectation: str, deadline: datetime, kind: str, at: datetime) -> None:
        """An alert was sent at ``at`` (first or again): counted, and no longer cleared."""

    @abc.abstractmethod
    def clear_calendar_alert(self, expectation: str, deadline: datetime, kind: str, at: datetime) -> None:
        """The problem the alert was about has ended (its next occurrence alerts at once)."""

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
        """Rescuer: take an UPLOADING row whose lease expired: epoch raised, owner set, lease
        cleared, so the old owner's later writes are refused. ``StateConflict`` if another
        owner's lease is still live, unless ``force`` (the caller knows that owner is dead: it
        held the instance lock), and always when the row is no longer UPLOADING (another
        rescuer settled it first: taking it again would settle it twice)."""

    # -- cluster: singletons and the node registry --------------------------------------
    @abc.abstractmethod
    def try_lead(self, name: str, owner: str, lease_seconds: float) -> bool:
        """Take or keep the lead of singleton ``name`` for ``lease_seconds`` (journal clock). True
        while ``owner`` holds it; call again well within the lease to keep it. The lead passes to
        another caller only once the lease has run out (or was resigned)."""

    @abc.abstractmethod
    def resign(self, name: str, owner: str) -> None:
        """Give up the lead of ``name`` now (clean stop: another node takes it without waiting)."""

    @abc.abstractmethod
    def leaders(self) -> dict[str, Lead]:
        """Every singleton's current lead (expired ones included: ``lease_until`` tells)."""

    @abc.abstractmethod
    def heartbeat_node(self, node: str, info: dict[str, Any]) -> None:
        """Register or refresh ``node`` (``info``: pid, version, routes... JSON-able)."""

    @abc.abstractmethod
    def nodes(self) -> list[NodeInfo]:
        """Every node that has sent a heartbeat, with what it holds and leads, by name."""

    # -- read-only views: the status web page (any node can serve it from the journal) ----------
    @abc.abstractmethod
    def search(self, query: SubmissionQuery, limit: int = 50, *, after: PageKey | None = None,
               before: PageKey | None = None) -> SubmissionPage:
        """One page of submissions matching ``query``, newest first (``created_at`` descending,
        then ``id`` descending). Keyset paging: ``after`` gives the rows older than that key,
        ``before`` the rows newer than it (still returned newest first); never OFFSET, so page
        1,000 costs what page 1 costs. ``text``: when a submission has that ``tracking_id``
        (and matches the other filters) the page is that one row; otherwise it selects the file
        names that start with ``text``."""

    @abc.abstractmethod
    def open_counts(self) -> dict[tuple[str, str], int]:
        """``(route, state) -> count`` of the submissions in a state that is not final."""

    @abc.abstractmethod
    def final_counts(self, since: datetime, until: datetime) -> dict[tuple[str, str], int]:
        """``(route, state) -> count`` of the submissions with ``since <= final_at < until``."""

    @abc.abstractmethod
    def final_histogram(self, edges: Sequence[datetime]) -> dict[tuple[int, str], int]:
        """``(bin, state) -> count`` of final outcomes per bin: bin ``i`` holds the submissions with
        ``edges[i] <= final_at < edges[i + 1]`` (``edges`` ascending; outcomes per day: day starts)."""

    @abc.abstractmethod
    def latency_histogram(self, edges: Sequence[datetime], bounds: Sequence[float]) -> dict[tuple[int, int], int]:
        """Drop → submitted time per period, as histogram counts: ``(bin, bucket) -> count`` of
        the submissions with ``edges[bin] <= uploaded_at < edges[bin + 1]`` whose
        ``uploaded_at - created_at`` in seconds is ``<= bounds[bucket]`` (and above the bound
        before it); bucket ``len(bounds)`` holds the longer ones. Computed by the database (the
        time difference is the one dialect-specific expression: SQLite ``julianday``,
        PostgreSQL ``EXTRACT(EPOCH FROM ...)``), so a month of uploads is never sent to Python."""

    @abc.abstractmethod
    def problems(self, states: Iterable[str], open_before: datetime, limit: int) -> list[Submission]:
        """Submissions that need a person, newest first, at most ``limit``: those with a ``flag``,
        those in one of ``states`` (e.g. UNCONFIRMED), and those in a state that is not final with
        ``COALESCE(uploaded_at, created_at)`` before ``open_before`` (no verdict for too long)."""

    @abc.abstractmethod
    def feedback_file(self, sub_id: int, feedback_id: int) -> FeedbackFile | None:
        """Feedback ``feedback_id`` if it was filed for submission ``sub_id``, else None."""

    @abc.abstractmethod
    def close(self) -> None: ...


FeedbackKey = tuple[str, "int | None", "str | None"]


def file_stem(name: str) -> str:
    """``name`` without its last extension (``a.tar.gz`` → ``a.tar``; ``noext`` and ``.rc`` whole),
    as the journal indexes it for ``feedback_candidates``."""
    return name if name.find(".") <= 0 else name[: name.rfind(".")]


def feedback_instant(value: datetime | str | None) -> str | None:
    """A remote file's modified time as the feedback once-only key holds it: the UTC instant at
    whole-second precision (``2025-08-22T21:29:58Z``), whatever the transport said.

    REST lists ``2025-08-22T17:29:58.000-04:00``, S3 ``2025-08-22 21:29:58+00:00``, SFTP integer
    seconds: the same ``out`` file must give the same key over each, or changing a route's
    transport would file every feedback file again. Truncated, not rounded: SFTP truncates.
    Text that is not a time (or a naive time, taken as UTC) is kept as it is / read as UTC.
    """
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            value = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
        except ValueError:
            return text
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class FeedbackAlreadyFiled(Exception):
    """``record_feedback`` for a remote file the journal has filed already (listed twice, or
    filed meanwhile by another process): filing it again would make a second copy."""

    def __init__(self, message: str, local_path: str | None = None):
        super().__init__(message)
        self.local_path = local_path  # where the earlier filing put it


# -- read-only views (the status web page) ------------------------------------------------------
# Times are compared as the journal stores them (UTC). Every method below must stay fast with
# 1,000,000 rows: each is one indexed query (see ``SQLiteStore``'s indexes and bench/web.py).

@dataclass(frozen=True)
class SubmissionQuery:
    """Filters of ``Store.search``; ``None`` means "any"."""

    text: str | None = None  # a tracking id (exact), else the start of a file name (case-sensitive)
    states: tuple[str, ...] | None = None
    route: str | None = None
    created_from: datetime | None = None  # inclusive
    created_to: datetime | None = None  # exclusive


@dataclass(frozen=True)
class PageKey:
    """Keyset paging position: a row's ``(created_at, id)``, the order of every page."""

    created_at: datetime
    id: int


@dataclass
class SubmissionPage:
    rows: list[Submission]
    older: PageKey | None  # pass as ``after`` for the next (older) page; None: this is the last
    newer: PageKey | None  # pass as ``before`` for the previous (newer) page; None: this is the first


# Reasons that stay with a submission that reached fileX (a wrong or corrupt copy of the file was
# filed): kept through SUBMITTED and the final verdict, so `status` and alerts keep saying it.
INTEGRITY_NOTES = ("a wrong copy reached fileX", "a corrupt copy reached fileX")


def integrity_note(reason: str | None) -> str | None:
    return reason if reason and reason.startswith(INTEGRITY_NOTES) else None


class StateConflict(Exception):
    """The submission was not in an expected state (someone else moved it on)."""


class JournalLocked(Exception):
    """Another ``filex-agent run`` holds this journal."""


class StaleEpoch(StateConflict):
    """A write carried a fencing epoch older than the submission's: its lease was taken over, so
    the writer must abandon what it was doing (upload nothing more, move nothing)."""


class Duplicate(ValueError):
    """A unique key already exists (a tracking id on two submissions, a feedback file filed twice)."""


class JournalUnavailable(TransientError):
    """The journal database cannot be reached (or stopped answering) after bounded retries. Work
    pauses: the caller waits and tries again; nothing was written that it does not know of,
    except where the message says the outcome of the last write is unknown (the connection was
    lost during its COMMIT): the caller re-reads before acting."""


class SchemaTooNew(FilexError):
    """The journal was migrated by a newer filex-agent than this one: refusing to start (an older
    node would not understand rows the newer schema allows)."""

    def __init__(self, found: int, supported: int, where: str):
        super().__init__(f"the journal at {where} has schema version {found}; this filex-agent supports "
                         f"up to {supported}: upgrade this node (never run an older agent on a newer journal)")
        self.found = found
        self.supported = supported


def iter_submissions(store: Store, query: SubmissionQuery | None = None, *, limit: int | None = None,
                     page: int = 500) -> Iterator[Submission]:
    """Submissions matching ``query``, newest first, read ``page`` rows at a time (keyset pages):
    a walk over a 100,000-row backlog never holds more than a page of it in memory."""
    query, after, left = query or SubmissionQuery(), None, limit
    while left is None or left > 0:
        found = store.search(query, page if left is None else min(left, page), after=after)
        yield from found.rows
        if left is not None:
            left -= len(found.rows)
        if found.older is None:
            return
        after = found.older


def open_store(path: Path | str, *, journal: Any = None) -> Store:
    """The configured journal: PostgreSQL when ``journal`` (a ``JournalSettings``) has a
    ``postgresql://`` URL, else the SQLite file at ``path``."""
    if journal is not None and journal.is_postgres:
        from filex_agent.store.postgres import open_postgres

        return open_postgres(journal)
    from filex_agent.store.sqlite import SQLiteStore

    return SQLiteStore(path)
