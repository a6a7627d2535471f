"""The one place that decides whether fileX has a file: evidence over journaled upload attempts.

An attempt whose answer was lost (bytes may have landed) is UNCONFIRMED. Nothing sends that
submission again until this reconciler, once per tracking cycle, has decided it:

- **SENT** on evidence that names this attempt: its tracking id past "Request Received"; for
  S3/SFTP a received tracking record with the same name, location and size whose
  ``submissionTime`` is not before the attempt started; or the object in ``in/`` with the same
  size, modified after the attempt started. ``in_arcv`` alone is never evidence (it holds
  earlier filings of the same name).
- **A wrong copy**: a record of this attempt (same tracking id, or same name and time) whose size
  differs from the file's. Never evidence of the file: said loudly, and the right file is sent.
- **NOT_SENT** when fileX, checked successfully, has shown no trace of it until ``decide_by``
  (``tracking.unconfirmed_settle_seconds`` after the attempt): then it is sent again, and the
  journal and audit say why.

fileX promises no delay between its bucket storing an upload and tracking showing it, so "not
yet" is never taken for "no" before the settle period is over.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from filex_agent.config import Config, RouteSettings
from filex_agent.errors import FilexError, PermanentError
from filex_agent.hooks import Hooks
from filex_agent.models import TrackingRecord
from filex_agent.store import Attempt, Outcome, State, StateConflict, Store, Submission, integrity_note

log = logging.getLogger(__name__)

# A row whose attempt is UNCONFIRMED: normally UNCONFIRMED itself; QUEUED only if a crash fell
# between the attempt's write and the row's (it is never sent while the attempt is open).
_DECIDABLE = frozenset({State.UNCONFIRMED, State.QUEUED})

# How far fileX's clock may be behind ours when its times are compared with an attempt's start.
CLOCK_SKEW = timedelta(minutes=2)


def received(rec: TrackingRecord) -> bool:
    """Bytes arrived: past "Request Received" (which only says a pre-signed URL was handed out)."""
    return (rec.status or "").strip().lower() not in ("", "request received") or bool(rec.downstreamStatus)


def norm_location(loc: str | None) -> str:
    return "/".join(p for p in (loc or "").split("/") if p)


def after(when: datetime | None, started: datetime) -> bool:
    """fileX's ``when`` is not before ``started`` (allowing for clock skew); unknown is not after."""
    return when is not None and when >= started - CLOCK_SKEW


@dataclass(frozen=True)
class Evidence:
    sent: bool  # True: fileX has this attempt's bytes; False: a wrong copy of them reached fileX
    what: str
    tracking_id: str | None = None


class Reconciler:
    def __init__(self, config: Config, store: Store, connections, submitter, hooks: Hooks, owner: str):
        self.config = config
        self.store = store
        self.connections = connections
        self.submitter = submitter
        self.hooks = hooks
        self.owner = owner

    def settle(self) -> timedelta:
        return timedelta(seconds=self.config.tracking.unconfirmed_settle_seconds)

    def run(self, stopping=lambda: False) -> int:
        """Decide what can be decided now; the number of attempts decided."""
        decided = 0
        records: dict[str, list[TrackingRecord] | FilexError] = {}  # all records, once per credential
        for att in self.store.unconfirmed():
            if stopping():
                break
            try:
                decided += self._decide(att, records)
            except StateConflict as exc:  # another node decided it meanwhile
                log.info("attempt %s of submission %s: %s", att.n, att.submission_id, exc)
            except Exception:  # noqa: BLE001 - one bad row must not stop the others
                log.exception("attempt %s of submission %s could not be reconciled", att.n, att.submission_id)
        return decided

    def _decide(self, att: Attempt, records: dict) -> int:
        sub = self.store.get(att.submission_id)
        if sub.state not in _DECIDABLE:
            # The row's state is written before the attempt's outcome: a crash between them leaves
            # the attempt open beside a row that has moved on. Finish the second write.
            if sub.state in (State.SUBMITTED, State.ACCEPTED, State.REJECTED, State.PARTIALLY_REJECTED):
                self.store.end_attempt(att.id, Outcome.SENT, "reconciled: the submission had reached fileX")
                return 1
            return 0  # UPLOADING: its owner (or the rescuer) settles it
        try:
            route = self.config.route(sub.route)
        except FilexError:
            self._flag(sub, f"upload unconfirmed and route {sub.route} is no longer configured; "
                            "it cannot be checked or sent again until the route is back")
            return 0
        try:
            ev = self.evidence(att, sub, route, records)
        except FilexError as exc:
            # Not checked is not "absent": wait, even past decide_by, until fileX can be asked.
            self._flag(sub, f"upload unconfirmed: fileX could not be checked yet ({exc}); "
                            f"nothing is sent again until it can be")
            return 0
        if ev is not None and ev.sent:
            self._sent(att, sub, ev)
            return 1
        if ev is not None:
            self._wrong_copy(att, sub, ev)
            return 1
        now = self.store.now()
        until = att.decide_by or (att.started_at + self.settle())
        if now < until:
            self._flag(sub, unconfirmed_flag(until))
            return 0
        why = (f"fileX showed no trace of attempt {att.n} in {self._age(att, now)} "
               f"(tracking.unconfirmed_settle_seconds = {self.config.tracking.unconfirmed_settle_seconds:g}); "
               "sending it again")
        sub = self.store.transition(sub.id, State.QUEUED, f"reconciled: {why}", expect=_DECIDABLE,
                                    flag=None, tracking_id=None, next_attempt_at=None, owner=None, lease_until=None)
        self.store.end_attempt(att.id, Outcome.NOT_SENT, why)  # second: a crash between is re-decided
        log.warning("submission %s (%s): %s", sub.id, sub.file_name, why)
        self.hooks.submission_changed(sub, "requeued")
        return 1

    @staticmethod
    def _age(att: Attempt, now: datetime) -> str:
        return f"{(now - att.started_at).total_seconds():.0f} s"

    # -- evidence --------------------------------------------------------------------------
    def evidence(self, att: Attempt, sub: Submission, route: RouteSettings, records: dict) -> Evidence | None:
        """What fileX shows of this attempt, or None. Raises FilexError if fileX cannot be read."""
        if self.connections.has_api(route.credential):
            api = self.connections.api(route.credential)
            if att.tracking_id:
                for rec in api.tracking(att.tracking_id):
                    if rec.trackingId == att.tracking_id and received(rec):
                        return self._sized(rec, sub, f"tracking {rec.trackingId} says {rec.status}")
            else:
                ev = self._record_match(att, sub, self._all_records(route.credential, api, records))
                if ev is not None:
                    return ev
            if att.transport == "rest":
                ev = self._listed_in(att, sub, route, api)
                if ev is not None:
                    return ev
        with self.connections.transport(route, att.transport) as transport:
            found = transport.find_uploaded(att.remote_name)
        if found is not None and found.size == sub.size and after(found.modified, att.started_at):
            return Evidence(True, f"{att.transport} in/{att.remote_name} ({found.size} bytes, "
                                  f"modified {found.modified:%Y-%m-%d %H:%M:%S})")
        return None

    @staticmethod
    def _all_records(cred: str, api, records: dict) -> list[TrackingRecord]:
        got = records.get(cred)
        if got is None:
            try:
                got = records[cred] = api.tracking()
            except FilexError as exc:
                got = records[cred] = exc
        if isinstance(got, FilexError):
            raise got
        return got

    def _record_match(self, att: Attempt, sub: Submission, records: list[TrackingRecord]) -> Evidence | None:
        """S3/SFTP: a received record of this name and location, submitted after the attempt began."""
        wrong = None
        for rec in sorted(records, key=lambda r: r.submissionTime or att.started_at):
            if (rec.fileName != att.remote_name or norm_location(rec.uploadLocation) != norm_location(att.upload_location)
                    or not received(rec) or not after(rec.submissionTime, att.started_at)):
                continue
            owner = self.store.by_tracking_id(rec.trackingId)
            if owner is not None and owner.id != sub.id:
                continue  # another submission's filing of the same name
            ev = self._sized(rec, sub, f"tracking {rec.trackingId} ({rec.fileName}, submitted "
                                       f"{rec.submissionTime:%Y-%m-%d %H:%M:%S})")
            if ev.sent:
                return ev
            wrong = wrong or ev
        return wrong

    def _listed_in(self, att: Attempt, sub: Submission, route: RouteSettings, api) -> Evidence | None:
        """REST: landed but not yet taken by fileX: still in ``in/`` (if fileX lets us list it)."""
        try:
            children = api.list_files(route.org, route.application, "in").children
        except PermanentError as exc:
            log.debug("listing in/ for %s: %s", att.remote_name, exc)
            return None
        for entry in children:
            if (entry.is_file and entry.name == att.remote_name and entry.metadata.contentLength == sub.size
                    and after(entry.metadata.lastModified, att.started_at)):
                return Evidence(True, f"in/{att.remote_name} present ({sub.size} bytes)", att.tracking_id)
        return None

    @staticmethod
    def _sized(rec: TrackingRecord, sub: Submission, what: str) -> Evidence:
        if rec.fileSize is not None and sub.size is not None and rec.fileSize != sub.size:
            return Evidence(False, f"{what}, but {rec.fileSize} bytes where the file has {sub.size}", rec.trackingId)
        return Evidence(True, what, rec.trackingId)

    # -- decisions -------------------------------------------------------------------------
    def _sent(self, att: Attempt, sub: Submission, ev: Evidence) -> None:
        fields = {"tracking_id": ev.tracking_id} if ev.tracking_id else {}
        sub = self.store.transition(
            sub.id, State.SUBMITTED, f"reconciled: fileX has it ({ev.what})", expect=_DECIDABLE,
            uploaded_at=self.store.now(), upload_location=att.upload_location, flag=None, next_attempt_at=None,
            reason=integrity_note(sub.reason),
            owner=None, lease_until=None, move_to=self.submitter.archive_dir(sub, "sent"), **fields)
        self.store.end_attempt(att.id, Outcome.SENT, f"reconciled: fileX has it ({ev.what})")
        log.info("submission %s (%s): fileX has attempt %d (%s)", sub.id, sub.file_name, att.n, ev.what)
        self.submitter.finish_move(sub)
        self.hooks.submission_changed(sub, "recovered")

    def _wrong_copy(self, att: Attempt, sub: Submission, ev: Evidence) -> None:
        why = (f"a wrong copy reached fileX: {ev.what}. FINRA may answer on it; the right file is sent again now"
               + (f" (the wrong copy's tracking id is {ev.tracking_id})" if ev.tracking_id else ""))
        sub = self.store.transition(sub.id, State.QUEUED, f"reconciled: {why}", expect=_DECIDABLE, reason=why,
                                    flag=None, tracking_id=None, next_attempt_at=None, owner=None, lease_until=None)
        self.store.end_attempt(att.id, Outcome.NOT_SENT, why)  # second: a crash between is re-decided
        log.error("submission %s (%s): %s", sub.id, sub.file_name, why)
        self.hooks.submission_changed(sub, "wrong_copy")

    def _flag(self, sub: Submission, text: str) -> None:
        if sub.flag != text:
            sub = self.store.update(sub.id, flag=text)
            self.hooks.submission_changed(sub, "flagged")


def decide_by(store: Store, config: Config) -> datetime:
    """When an attempt that became UNCONFIRMED now stops waiting for fileX's evidence."""
    return store.now() + timedelta(seconds=config.tracking.unconfirmed_settle_seconds)


def unconfirmed_flag(decide_by: datetime) -> str:
    return (f"upload unconfirmed: the answer was lost and the bytes may be at fileX; not sent again unless "
            f"fileX shows no trace of it by {decide_by:%Y-%m-%d %H:%M:%S} UTC")
