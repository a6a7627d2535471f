"""Download every new file of a route's ``out`` sub-space once, and link it to its submission.

Remote names are untrusted: sanitised before they touch the disk; written through a temporary
file, fsynced and linked under a free name (never overwriting); recorded in the journal so
each remote file is downloaded once.
"""

from __future__ import annotations

import errno
import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path

from filex_agent.config import Config, RouteSettings
from filex_agent.errors import AuthError, FilexError, NotEntitledError, PermanentError
from filex_agent.fsutil import atomic_writer, sanitize_remote_name
from filex_agent.hooks import Hooks
from filex_agent.store import FeedbackAlreadyFiled, Store, Submission, feedback_instant, file_stem
from filex_agent.transports import RemoteFile

log = logging.getLogger(__name__)


LINK_SKEW = timedelta(seconds=5)  # a listing's time is truncated to the second, and clocks differ
MIN_STEM = 3  # a shorter stem ("a", "fb") would link feedback to unrelated files


def name_parts(remote_name: str) -> set[str]:
    """Every part of a name that starts and ends at its edges or next to a character that is not
    a letter or digit: the tracking id or file stem a feedback name may contain. Whole parts only,
    so ``report_1`` is not found in ``report_12_fb.txt``."""
    cuts = [i for i, c in enumerate(remote_name) if not c.isalnum()]
    starts = [0, *(i + 1 for i in cuts)]
    ends = [*cuts, len(remote_name)]
    return {remote_name[a:b] for a in starts for b in ends if b - a >= MIN_STEM}


def link_submission(remote_name: str, modified: datetime | None, candidates: list[Submission]) -> Submission | None:
    """The submission a feedback file belongs to, among ``candidates`` (submissions that reached
    fileX, see ``Store.feedback_candidates``):

    1. the one whose tracking id is in the name;
    2. else by file stem in the name, the longest stem (``a`` and ``a_v2``), and of those the one
       uploaded most recently *before* the feedback file's time: yesterday's late feedback is not
       given to today's resubmission of the same name, uploaded after it appeared.
    """
    parts = name_parts(remote_name)
    by_id = [s for s in candidates if s.tracking_id and s.tracking_id in parts]
    if by_id:
        return max(by_id, key=_upload_order)
    by_stem = [s for s in candidates if file_stem(s.file_name) in parts and len(file_stem(s.file_name)) >= MIN_STEM]
    if modified is not None:
        by_stem = [s for s in by_stem if s.uploaded_at is None or s.uploaded_at <= modified + LINK_SKEW]
    if not by_stem:
        return None
    longest = max(len(file_stem(s.file_name)) for s in by_stem)
    return max((s for s in by_stem if len(file_stem(s.file_name)) == longest), key=_upload_order)


def _upload_order(sub: Submission) -> tuple[datetime, int]:
    return (sub.uploaded_at or datetime.min.replace(tzinfo=timezone.utc), sub.id)


def _modified(f: RemoteFile) -> str | None:
    return feedback_instant(f.modified)  # the same key whichever transport listed the file


def _key(f: RemoteFile) -> tuple[str, int | None, str | None]:
    return (f.name, f.size, _modified(f))


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "no space left on the feedback folder's disk; nothing partial was kept, will retry"
    return str(exc)


class FeedbackCollector:
    def __init__(self, config: Config, store: Store, connections, hooks: Hooks):
        self.config = config
        self.store = store
        self.connections = connections
        self.hooks = hooks
        self.pace = lambda: None  # the daemon's Pacer: files being claimed and uploaded go first

    def collect(self, route: RouteSettings) -> int:
        """Download new feedback of one route; returns how many files were filed."""
        dest = route.folder("feedback", self.config.agent.data_dir)
        with self.connections.transport(route) as transport:
            listing = transport.list_feedback()
            # The keys of the files listed only (a few queries whatever the size of the listing),
            # not the route's years of feedback: the cycle costs what fileX lists.
            filed, doubt = self.store.feedback_keys(route.name, {f.name for f in listing})
            # Each remote file once, even if the listing shows it twice.
            new = list({_key(f): f for f in listing if _key(f) not in filed}.values())
            if not new:
                return 0
            first_time = (not route.download_existing_feedback and not filed and not doubt
                          and not self.store.route_has_history(route.name))
            n = 0
            for f in new:
                self.pace()
                try:
                    n += self._one(route, transport, f, dest, first_time, in_doubt=_key(f) in doubt)
                except FeedbackAlreadyFiled as exc:
                    # Filed meanwhile (by another process on this journal): nothing more to do;
                    # the key is in the journal, so it is not listed as new again.
                    log.warning("route %s: %s; not filed a second time", route.name, exc)
            return n

    def _one(self, route: RouteSettings, transport, f: RemoteFile, dest: Path, first_time: bool,
             in_doubt: bool) -> int:
        if first_time:
            # Only record what was there before the agent ever submitted on this route.
            self.store.record_feedback(route.name, f.name, f.size, _modified(f), None, None)
            return 0
        try:
            return self._download(route, transport, f, dest, in_doubt=in_doubt)
        except (AuthError, NotEntitledError):
            raise  # the route's credentials, not this file: the whole cycle stops here
        except PermanentError as exc:
            # This file can never be fetched (e.g. a name fileX itself should not allow):
            # say so once and do not try again every cycle.
            log.error("route %s: feedback %r cannot be downloaded: %s; recorded as not downloadable",
                      route.name, f.name, exc)
            self.store.record_feedback(route.name, f.name, f.size, _modified(f), None, None)
            self._flag(self.link(route, f), f"feedback {f.name!r} cannot be downloaded: {exc}")
        except (FilexError, OSError) as exc:
            log.warning("route %s: feedback %r not downloaded yet: %s", route.name, f.name, _why(exc))
            self._flag(self.link(route, f), f"feedback {f.name!r} not downloaded yet: {_why(exc)}")
        return 0

    def _flag(self, sub: Submission | None, text: str) -> None:
        if sub is not None and self.store.get(sub.id).flag != text:
            self.hooks.submission_changed(self.store.update(sub.id, flag=text), "flagged")

    def link(self, route: RouteSettings, f: RemoteFile) -> Submission | None:
        """The submission ``f`` belongs to: looked up by the parts of its name, not by reading
        the route's history."""
        modified = f.modified
        if modified is not None and modified.tzinfo is None:
            modified = modified.replace(tzinfo=timezone.utc)
        return link_submission(f.name, modified, self.store.feedback_candidates(route.name, name_parts(f.name)))

    def _download(self, route: RouteSettings, transport, f: RemoteFile, dest: Path, in_doubt: bool = False) -> int:
        local_name = sanitize_remote_name(f.name)
        if local_name != f.name:
            log.warning("route %s: feedback name %r is not a safe local name; filed as %r", route.name, f.name,
                        local_name)
        if not in_doubt:
            # Write-ahead: a crash after the file is linked but before it is recorded leaves this
            # row "in doubt", and the next download then reuses an identical file instead of
            # filing a second copy.
            self.store.begin_feedback(route.name, f.name, f.size, _modified(f))
        with atomic_writer(dest, local_name, reuse_identical=in_doubt,
                           perms=self.config.file_perms) as (out, result):
            transport.download_feedback(f.name, out)
        path = result[0]
        sub = self.link(route, f)
        try:
            self.store.record_feedback(route.name, f.name, f.size, _modified(f), str(path), sub.id if sub else None)
        except FeedbackAlreadyFiled as exc:
            if not in_doubt and exc.local_path != str(path):
                path.unlink(missing_ok=True)  # made just now (no reuse): it would be a second copy
            raise
        log.info("route %s: feedback %s filed as %s%s", route.name, f.name, path,
                 f" (submission {sub.id})" if sub else "")
        if sub is not None:
            current = self.store.get(sub.id)
            if current.flag and current.flag.startswith("feedback "):
                current = self.store.update(sub.id, flag=None)  # the earlier trouble is over
            self.hooks.submission_changed(current, "feedback")
        return 1

    def collect_all(self) -> int:
        n = 0
        for route in self.config.routes:
            try:
                n += self.collect(route)
            except FilexError as exc:
                log.warning("route %s: feedback listing failed: %s", route.name, exc)
        return n
