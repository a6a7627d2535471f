"""Follow SUBMITTED submissions through fileX tracking until a final status.

One ``GET /tracking`` (all submissions of the last 90 days) per credential per cycle when many
are pending or some have no tracking id (S3/SFTP uploads are matched by file name, upload
location, size and time); per-id calls otherwise.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import timedelta

from filex_agent.config import Config
from filex_agent.errors import AuthError, FilexError, PermanentError
from filex_agent.hooks import Hooks
from filex_agent.models import TrackingRecord
from filex_agent.reconciler import after, norm_location, received
from filex_agent.store import State, Store, Submission, integrity_note, utcnow
from filex_agent.submitter import Submitter

log = logging.getLogger(__name__)

OUTCOME = {"ACCEPTED": State.ACCEPTED, "REJECTED": State.REJECTED, "PARTIALLY_REJECTED": State.PARTIALLY_REJECTED}
ARCHIVE = {State.ACCEPTED: "accepted", State.REJECTED: "rejected", State.PARTIALLY_REJECTED: "rejected"}
_UNREADABLE = "fileX tracking could not be read"


def matches(rec: TrackingRecord, sub: Submission) -> bool:
    """Is ``rec`` the tracking record of an upload that returned no tracking id (S3, SFTP)?

    Only a record of bytes that arrived (never "Request Received": a URL handed out, perhaps by
    an earlier REST attempt), of the same name, location and size, submitted after the upload
    began by fileX's ``submissionTime`` (a status update time says nothing of when it came).
    """
    if rec.fileName != sub.file_name or not received(rec):
        return False
    if norm_location(rec.uploadLocation) != norm_location(sub.upload_location):
        return False
    if rec.fileSize is not None and sub.size is not None and rec.fileSize != sub.size:
        return False
    return sub.upload_started_at is not None and after(rec.submissionTime, sub.upload_started_at)


class Tracker:
    def __init__(self, config: Config, store: Store, connections, submitter: Submitter, hooks: Hooks):
        self.config = config
        self.store = store
        self.connections = connections
        self.submitter = submitter
        self.hooks = hooks

    def poll(self) -> int:
        """One tracking cycle; returns the number of submissions that reached a final status."""
        by_cred: dict[str, list[Submission]] = defaultdict(list)
        for sub in self.store.list([State.SUBMITTED]):
            try:
                route = self.config.route(sub.route)
            except FilexError:
                log.warning("submission %s: route %s is no longer configured; not tracked", sub.id, sub.route)
                continue
            by_cred[route.credential].append(sub)
        finals, ok = 0, True
        for cred, subs in by_cred.items():
            if not self.connections.has_api(cred):
                for sub in subs:
                    self._flag(sub, "no FIP API credential (client_id/client_secret) for tracking; "
                                    "the outcome will only show in feedback files")
                continue
            try:
                finals += self._poll_credential(cred, subs)
            except FilexError as exc:
                ok = False
                log.warning("tracking poll for credential %s failed: %s", cred, exc)
                for sub in subs:  # visible in `status` until a poll succeeds again
                    self._flag(self.store.get(sub.id), f"{_UNREADABLE}: {exc}")
        self.hooks.tracking_polled(ok)
        return finals

    def _poll_credential(self, cred: str, subs: list[Submission]) -> int:
        api = self.connections.api(cred)
        need_all = len(subs) >= self.config.tracking.batch_threshold or any(not s.tracking_id for s in subs)
        records: dict[str, TrackingRecord] = {}
        failed: set[int] = set()
        if need_all:
            for rec in api.tracking():
                records[rec.trackingId] = rec
        else:
            for sub in subs:
                try:
                    found = api.tracking(sub.tracking_id)
                except AuthError:
                    raise
                except PermanentError as exc:  # e.g. 404 for an id fileX does not know (yet)
                    log.warning("submission %s: tracking %s: %s", sub.id, sub.tracking_id, exc)
                    self._flag(sub, f"{_UNREADABLE}: {exc}")
                    failed.add(sub.id)
                    continue
                for rec in found:
                    records[rec.trackingId] = rec
        claimed: set[str] = set()  # matched in this cycle; earlier matches are found in the journal
        finals = 0
        # Read again now (another node may have moved them meanwhile), in one query, not one per row.
        fresh = self.store.get_many([s.id for s in subs if s.id not in failed])
        # Upload order: two uploads of one name take their records in the order they were sent.
        for sub in sorted(subs, key=lambda s: (s.upload_started_at or s.created_at, s.id)):
            if sub.id in failed or sub.id not in fresh:
                continue
            sub = self._clear_unreadable(fresh[sub.id])
            rec = records.get(sub.tracking_id) if sub.tracking_id else None
            if sub.tracking_id is None:
                rec = self._match(sub, records.values(), claimed)
                if rec is not None:
                    claimed.add(rec.trackingId)
                    sub = self.store.transition(sub.id, State.SUBMITTED, f"matched tracking record {rec.trackingId}",
                                                tracking_id=rec.trackingId, flag=None)
            if rec is None:
                self._check_overdue(sub)
                continue
            if self._apply(sub, rec):
                finals += 1
        return finals

    def _clear_unreadable(self, sub: Submission) -> Submission:
        if sub.flag and sub.flag.startswith(_UNREADABLE):
            return self.store.update(sub.id, flag=None)
        return sub

    def _match(self, sub: Submission, records, claimed: set[str]) -> TrackingRecord | None:
        cands = [r for r in records if r.trackingId not in claimed and matches(r, sub)]
        cands.sort(key=lambda r: r.submissionTime)
        for rec in cands:
            if self.store.by_tracking_id(rec.trackingId) is None:
                return rec
        return None

    def _apply(self, sub: Submission, rec: TrackingRecord) -> bool:
        downstream = (rec.downstreamStatus or "").upper() or None
        if (rec.status, downstream) != (sub.remote_status, sub.downstream_status):
            sub = self.store.transition(sub.id, State.SUBMITTED, f"tracking: {rec.status} / {downstream}",
                                        remote_status=rec.status, downstream_status=downstream)
        final = OUTCOME.get(downstream or "")
        if final is None:
            self._check_overdue(sub)
            return False
        reason = None
        if final is State.REJECTED:
            reason = "FINRA rejected the file: correct it and resubmit the whole file (see feedback)"
        elif final is State.PARTIALLY_REJECTED:
            reason = "FINRA partially rejected the file: submit a new file with only the corrected data (see feedback)"
        note = integrity_note(sub.reason)
        if note:  # FINRA's verdict is on what reached it; the note says what that was
            reason = f"{note}; {reason}" if reason else note
        # The move is journaled with the final state (write-ahead): a crash between the two
        # cannot leave the original in the spool of a finished submission.
        sub = self.store.transition(sub.id, final, f"final: {downstream}", expect={State.SUBMITTED},
                                    final_at=utcnow(), reason=reason, flag=None,
                                    move_to=self.submitter.archive_dir(sub, ARCHIVE[final]))
        sub = self.submitter.finish_move(sub)
        self.hooks.submission_changed(sub, final.value)
        return True

    def _check_overdue(self, sub: Submission) -> None:
        now = utcnow()
        t = self.config.tracking
        since = sub.uploaded_at or sub.updated_at
        if sub.tracking_id is None and now - since > timedelta(seconds=t.match_timeout_seconds):
            self._flag(sub, f"no tracking record matched {sub.file_name} at {sub.upload_location} "
                            f"within {int(t.match_timeout_seconds)} s of upload; check `filex-agent track`")
        elif now - since > timedelta(hours=t.final_timeout_hours):
            self._flag(sub, f"no final status {t.final_timeout_hours:g} h after upload")

    def _flag(self, sub: Submission, text: str) -> None:
        if sub.flag != text:
            sub = self.store.update(sub.id, flag=text)
            log.warning("submission %s: %s", sub.id, text)
            self.hooks.submission_changed(sub, "flagged")
