"""Download every new file of a route's ``out`` sub-space once, and link it to its submission.

Remote names are untrusted: sanitised before they touch the disk; written through a temporary
file, fsynced and linked under a free name (never overwriting); recorded in the journal so
each remote file is downloaded once.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path

from filex_agent.config import Config, RouteSettings
from filex_agent.errors import AuthError, FilexError, NotEntitledError, PermanentError
from filex_agent.fsutil import atomic_writer, sanitize_remote_name
from filex_agent.hooks import Hooks
from filex_agent.store import Duplicate, Store, Submission
from filex_agent.transports import RemoteFile

log = logging.getLogger(__name__)


def link_submission(remote_name: str, subs: list[Submission]) -> Submission | None:
    """The submission a feedback file belongs to: its tracking id, else its file stem, in the name.

    The longest stem wins (``a.csv`` and ``a_v2.csv``), then the newest submission.
    """
    for sub in sorted(subs, key=lambda s: -s.id):
        if sub.tracking_id and sub.tracking_id in remote_name:
            return sub
    best: Submission | None = None
    for sub in sorted(subs, key=lambda s: -s.id):
        stem = Path(sub.file_name).stem
        if len(stem) >= 3 and stem in remote_name and (best is None or len(stem) > len(Path(best.file_name).stem)):
            best = sub
    return best


def _modified(f: RemoteFile) -> str | None:
    return f.modified.isoformat() if f.modified else None


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

    def collect(self, route: RouteSettings) -> int:
        """Download new feedback of one route; returns how many files were filed."""
        dest = route.folder("feedback", self.config.agent.data_dir)
        with self.connections.transport(route) as transport:
            listing = transport.list_feedback()
            # One query for the whole route, whatever the size of the listing.
            filed, doubt = self.store.feedback_keys(route.name)
            new = [f for f in listing if _key(f) not in filed]
            if not new:
                return 0
            subs = self.store.list(route=route.name)
            first_time = (not subs and not filed and not doubt and not route.download_existing_feedback)
            n = 0
            for f in new:
                if first_time:
                    # Only record what was there before the agent ever submitted on this route.
                    self.store.record_feedback(route.name, f.name, f.size, _modified(f), None, None)
                    continue
                try:
                    n += self._download(route, transport, f, dest, subs, in_doubt=_key(f) in doubt)
                except (AuthError, NotEntitledError):
                    raise  # the route's credentials, not this file: the whole cycle stops here
                except PermanentError as exc:
                    # This file can never be fetched (e.g. a name fileX itself should not allow):
                    # say so once and do not try again every cycle.
                    log.error("route %s: feedback %r cannot be downloaded: %s; recorded as not downloadable",
                              route.name, f.name, exc)
                    self.store.record_feedback(route.name, f.name, f.size, _modified(f), None, None)
                    self._flag(link_submission(f.name, subs), f"feedback {f.name!r} cannot be downloaded: {exc}")
                except (FilexError, OSError) as exc:
                    log.warning("route %s: feedback %r not downloaded yet: %s", route.name, f.name, _why(exc))
                    self._flag(link_submission(f.name, subs), f"feedback {f.name!r} not downloaded yet: {_why(exc)}")
            return n

    def _flag(self, sub: Submission | None, text: str) -> None:
        if sub is not None and self.store.get(sub.id).flag != text:
            self.hooks.submission_changed(self.store.update(sub.id, flag=text), "flagged")

    def _download(self, route: RouteSettings, transport, f: RemoteFile, dest: Path, subs: list[Submission],
                  in_doubt: bool = False) -> int:
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
        sub = link_submission(f.name, subs)
        try:
            self.store.record_feedback(route.name, f.name, f.size, _modified(f), str(path), sub.id if sub else None)
        except Duplicate:
            # Agents sharing a journal: a collector paused past its lead resumed after the new
            # leader had filed this file. The recorded copy stands; this one goes.
            recorded = [x.local_path for x in self.store.feedback_for(sub.id)
                        if x.remote_name == f.name] if sub is not None else []
            if recorded and Path(recorded[0]) != path:
                path.unlink(missing_ok=True)
            log.info("route %s: feedback %s was filed meanwhile by another agent", route.name, f.name)
            return 0
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
