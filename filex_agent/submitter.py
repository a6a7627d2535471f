"""Claim → validate → upload → archive, one submission at a time, journal first.

Write-ahead: the journal records the intended step before it is taken (CLAIMING before the
rename, UPLOADING before the first byte, ``move_to`` before a local move) and confirms it
after, so recovery (``recover()``) can finish or undo any step a crash interrupted.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import stat as stat_mod
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

from filex_agent.config import Config, RouteSettings, valid_remote_name
from filex_agent.errors import (
    AuthError,
    CorruptFiling,
    CredentialsRefused,
    PermanentError,
    RemoteChangedError,
    TransientError,
    UploadUnconfirmed,
)
from filex_agent.fsutil import apply_perms, forget_move_marker, move_no_clobber, sha256_file, write_reason
from filex_agent.localfile import LocalFile
from filex_agent.hooks import Hooks
from filex_agent.leases import new_owner
from filex_agent.reconciler import decide_by, unconfirmed_flag
from filex_agent.spool import SPOOL, SpoolError, check_spool, claim_into_spool, opened_spool, spool_dir
from filex_agent.store import (Attempt, Outcome, StaleEpoch, State, StateConflict, Store, Submission, Transition,
                               integrity_note, utcnow)

log = logging.getLogger(__name__)

# Files up to this size are hashed while their row is still CLAIMING, and queued with the
# verdict in the same write; bigger ones are queued first (hashing takes seconds per GiB).
_CHECK_BEFORE_QUEUED = 64 * 1024 * 1024
MAX_UNEXPECTED = 3  # unexpected (non-classified) errors before a file is failed, not retried forever
MAX_TOKEN_REFUSALS = 6  # fresh tokens refused by fileX before a file is failed
_RELEASE = {"owner": None, "lease_until": None}  # fields that end a worker's ownership


class Submitter:
    def __init__(self, config: Config, store: Store, connections, hooks: Hooks, owner: str | None = None):
        self.config = config
        self.store = store
        self.connections = connections
        self.hooks = hooks
        self.owner = owner or new_owner(config)  # leases taken by this process's workers
        self.leased: set[int] = set()  # submissions this process is uploading right now
        self._leased_lock = threading.Lock()

    # -- claim ---------------------------------------------------------------------------
    def claim(self, route: RouteSettings, path: Path, trigger: Path | None = None) -> Submission | None:
        """Take ``path`` out of the outbox by an atomic rename. None if it is gone already."""
        done = self.claim_many(route, [(path, trigger)])
        return done[0] if done else None

    def claim_many(self, route: RouteSettings, files: list[tuple[Path, Path | None]]) -> list[Submission]:
        """``claim`` of several files of one route (an outbox scan), with one journal write for
        their CLAIMING rows and one for their verdicts, instead of several per file."""
        live = []
        for path, trigger in files:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                _consume(trigger)  # vanished: its trigger must not release the next file of that name
                continue
            if not stat_mod.S_ISDIR(st.st_mode):
                live.append((path, trigger))
        if not live:
            return []
        try:
            check_spool(route)
        except SpoolError as exc:
            # Not the files' fault: they stay in the outbox, and are taken once the spool is fixed.
            log.error("%s; %s stay(s) in the outbox", exc, ", ".join(p.name for p, _ in live[:5]))
            return []
        spool = str(spool_dir(route))
        # owner: who is claiming, so that recovery leaves a live agent's claim alone. The spool
        # path is journaled with the row, before the rename, so recovery knows where to look.
        subs = self.store.create_claims(
            dict(route=route.name, org=route.org, application=route.application, transport=route.transports[0],
                 owner=self.owner),
            [(p.name, str(p)) for p, _ in live], lambda sub_id, name: f"{spool}/{sub_id}/{name}")
        pending = []
        for (path, trigger), sub in zip(live, subs):
            if sub is None:
                log.debug("%s is being claimed by another agent", path)
            else:
                pending.append((sub, trigger))
        return [s for s in self._complete_claims(route, pending) if s is not None]

    def complete_claim(self, sub: Submission, trigger: Path | None = None) -> Submission | None:
        """Second half of a claim (also used by recovery): refuse links, rename into the spool.
        None when another agent sharing the journal claimed the file first (this row is gone)."""
        return self._complete_claims(self.config.route(sub.route), [(sub, trigger)])[0]

    def _complete_claims(self, route: RouteSettings,
                         pending: list[tuple[Submission, Path | None]]) -> list[Submission | None]:
        out: list[Submission | None] = []
        moved: list[Submission] = []
        with opened_spool(route) as spool_fd:
            for sub, trigger in pending:
                path = Path(sub.source_path)
                if trigger is None and route.readiness == "trigger":
                    trigger = path.with_name(path.name + route.trigger_suffix)  # recovery finishing a claim
                done = self._rename_into_spool(route, sub, path, trigger, spool_fd)
                if isinstance(done, _InSpool):
                    moved.append(done.sub)
                    done = None
                out.append(done)
        checked = iter(self._queue_claimed(route, moved))
        return [next(checked) if done is None else (None if done is _GONE else done) for done in out]

    def _rename_into_spool(self, route: RouteSettings, sub: Submission, path: Path, trigger: Path | None,
                           spool_fd: int) -> "_InSpool | Submission | object":
        """``_InSpool`` once the file is in the spool; else what became of the claim (``_GONE``: nothing)."""
        # Consumed first, on every path that takes the file (claimed, refused, vanished): a trigger
        # left behind would release the next file of that name while it is being written.
        _consume(trigger)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return self._vanished(sub) or _GONE
        if stat_mod.S_ISLNK(st.st_mode):
            target = os.readlink(path)
            return self._fail(sub, path, f"refused: {path.name} is a symbolic link (to {target}); "
                                         "links are never filed with a regulator — copy the file itself into the outbox")
        if not stat_mod.S_ISREG(st.st_mode):
            return self._fail(sub, path, f"refused: {path.name} is not a regular file")
        target = Path(f"{spool_dir(route)}/{sub.id}/{path.name}")
        if sub.local_path != str(target):  # a row from before the spool path was journaled at creation
            sub = self.store.update(sub.id, local_path=str(target))
        try:
            problem = claim_into_spool(route, sub.id, path, spool_fd)
        except FileNotFoundError:
            return self._vanished(sub) or _GONE
        if problem:
            return self._fail(sub, target, problem)
        return _InSpool(sub)

    def _queue_claimed(self, route: RouteSettings, subs: list[Submission]) -> list[Submission]:
        """Check the files just renamed into the spool and queue them, in one journal write.

        A file over ``_CHECK_BEFORE_QUEUED`` is queued first and checked after (the old order):
        hashing gigabytes must not keep a row CLAIMING long enough to look abandoned."""
        steps: list[Transition] = []
        later: list[Submission] = []
        failed: dict[int, str] = {}
        held: dict[int, "_Earlier | Submission"] = {}
        batch_sha: dict[str, _Earlier] = {}
        for sub in subs:
            path = Path(sub.local_path)
            try:
                big = os.stat(sub.local_path).st_size > _CHECK_BEFORE_QUEUED
            except OSError:
                big = False
            if big:
                later.append(sub)
                steps.append(Transition(sub.id, State.QUEUED, "claimed", frozenset({State.CLAIMING}), dict(owner=None)))
                continue
            checked = self._check(sub, path)
            if isinstance(checked, str):
                failed[sub.id] = checked
                continue
            steps.append(Transition(sub.id, State.QUEUED, "claimed", frozenset({State.CLAIMING}),
                                    dict(owner=None, size=checked.size, mtime_ns=checked.mtime_ns,
                                         sha256=checked.sha256)))
            earlier = batch_sha.get(checked.sha256) or self.store.find_same_content(
                sub.org, sub.application, checked.sha256, exclude_id=sub.id)
            batch_sha.setdefault(checked.sha256, _Earlier(sub.id, sub.file_name, State.QUEUED))
            if earlier is not None:
                held[sub.id] = earlier
                steps.append(Transition(sub.id, State.HELD, "duplicate", frozenset({State.QUEUED}), dict(
                    held_by=earlier.id, reason=_held_reason(sub.id, checked.sha256, earlier))))
        results = self.store.transition_many(steps) if steps else []
        final: dict[int, Submission | None] = {}
        for step, res in zip(steps, results):
            if isinstance(res, StateConflict):
                # A rescuer finished this very claim meanwhile (it looked abandoned): its work stands.
                log.info("submission %s: %s", step.sub_id, res)
                final.setdefault(step.sub_id, None)
            else:
                final[step.sub_id] = res
        claimed = [s for s in final.values() if s is not None]
        if claimed:
            self.hooks.submissions_changed(claimed, "claimed")
        for sub_id, earlier in held.items():
            if final.get(sub_id) is not None and final[sub_id].state is State.HELD:
                self.hooks.submission_changed(final[sub_id], "HELD")
        for sub in later:
            if final.get(sub.id) is not None:
                final[sub.id] = self.validate(final[sub.id])
        out = []
        for sub in subs:
            if sub.id in failed:
                out.append(self._fail(sub, Path(sub.local_path), failed[sub.id], expect=State.CLAIMING))
            else:
                out.append(final.get(sub.id))
        return out

    def _vanished(self, sub: Submission) -> Submission | None:
        if self.store.discard_claim(sub.id):  # another agent's claim took it: let go, silently
            log.debug("%s was claimed by another agent", sub.source_path)
            return None
        try:
            return self.store.transition(sub.id, State.FAILED, "vanished", expect={State.CLAIMING}, final_at=utcnow(),
                                         owner=None, reason="the file disappeared from the outbox before it was "
                                                            "claimed; nothing was sent")
        except StateConflict:  # a rescuer completed this very claim meanwhile: the file is in the spool
            return None

    def validate(self, sub: Submission) -> Submission:
        """Name rules, size, readability, duplicate content. FAILED/HELD or stays QUEUED.

        The row is QUEUED already, so another agent sharing the journal may start (and even
        finish and archive) it meanwhile: every verdict here applies only while it is still
        QUEUED, else the other agent's work stands."""
        try:
            return self._validate(sub)
        except StateConflict as exc:
            log.info("submission %s was taken on by another agent while it was checked: %s", sub.id, exc)
            return self.store.get(sub.id)

    def _validate(self, sub: Submission) -> Submission:
        path = Path(sub.local_path)
        checked = self._check(sub, path)
        if isinstance(checked, str):
            return self._fail(sub, path, checked, expect=State.QUEUED)
        sub = self.store.update(sub.id, size=checked.size, mtime_ns=checked.mtime_ns, sha256=checked.sha256)
        earlier = self.store.find_same_content(sub.org, sub.application, checked.sha256, exclude_id=sub.id)
        if earlier is not None:
            sub = self.store.transition(sub.id, State.HELD, "duplicate", expect={State.QUEUED}, held_by=earlier.id,
                                        reason=_held_reason(sub.id, checked.sha256, earlier))
            self.hooks.submission_changed(sub, "HELD")
        return sub

    def _check(self, sub: Submission, path: Path) -> "_Checked | str":
        """Name rules, size and readability, and the content's hash (nothing written), or why
        the file cannot be submitted."""
        route = self.config.route(sub.route)
        reason = valid_remote_name(sub.file_name)
        if reason:
            return f"{reason}; the file was not uploaded. Rename it and drop it again."
        try:
            st = path.stat()
            if st.st_nlink > 1:
                # Another name can still change these bytes: submit a private copy instead.
                log.warning("%s has %d hard links: submitting a private copy", path, st.st_nlink)
                _private_copy(path)
                st = path.stat()
            if st.st_size == 0:
                return "the file is empty; nothing was uploaded"
            limit = route.max_size_mb * 1024 * 1024
            if st.st_size > limit:
                return (f"the file is {st.st_size} bytes, over the route's limit of "
                        f"{route.max_size_mb} MB (max_size_mb); not uploaded")
            digest = sha256_file(path)
        except PermissionError:
            return "the file cannot be read by the agent (permission denied); not uploaded"
        except OSError as exc:
            return f"the file cannot be read: {exc.strerror}; not uploaded"
        return _Checked(st.st_size, st.st_mtime_ns, digest)

    def release(self, sub_id: int) -> Submission:
        sub = self.store.transition(sub_id, State.QUEUED, "released by operator", expect={State.HELD},
                                    reason=None, next_attempt_at=None)
        self.hooks.submission_changed(sub, "released")
        return sub

    # -- upload --------------------------------------------------------------------------
    def upload(self, sub_id: int) -> Submission:
        """One upload attempt, journaled before its first byte and owned under a lease.

        Outcomes: SENT (SUBMITTED), NOT_SENT (QUEUED again, or FAILED on a permanent refusal) or
        UNCONFIRMED when the bytes may have landed and the answer is unknown: then nothing sends
        it again until the reconciler has decided from fileX's evidence. Every write carries the
        attempt's fencing epoch; if the lease was taken over meanwhile, the attempt is abandoned.
        """
        try:
            sub = self.store.get(sub_id)
            sub, att = self.store.begin_upload(
                sub_id, self.owner, self.config.journal.lease_seconds, transport=sub.transport,
                remote_name=sub.file_name, upload_location=f"{sub.org}/{sub.application}/in")
        except StateConflict:
            return self.store.get(sub_id)
        with self._leased_lock:
            self.leased.add(sub.id)
        try:
            return self._attempt(sub, att)
        except StaleEpoch as exc:
            log.warning("submission %s: attempt %d abandoned: %s", sub.id, att.n, exc)
            return self.store.get(sub.id)
        finally:
            with self._leased_lock:
                self.leased.discard(sub.id)

    def _attempt(self, sub: Submission, att: Attempt) -> Submission:
        route = self.config.route(sub.route)
        path = Path(sub.local_path)
        epoch = sub.epoch

        def on_ticket(ticket: str) -> None:
            self.store.set_ticket(att.id, epoch, ticket)

        def on_commit() -> None:
            # Write-ahead: from here on the attempt may become a filing. A stale epoch raises
            # and aborts the request before it goes out.
            self.store.commit_attempt(att.id, epoch)

        def committed() -> bool:
            return any(a.id == att.id and a.may_have_landed for a in self.store.attempts(sub.id))

        try:
            # One descriptor, O_NOFOLLOW: a symlink swapped in after the claim is never followed,
            # and every byte sent (and hashed) is read through it.
            with LocalFile.open(path) as local, self.connections.transport(route, sub.transport) as transport:
                if (local.size, local.mtime_ns) != (sub.size, sub.mtime_ns):
                    raise _Changed()
                if not transport.reports_commit:
                    on_commit()  # no finer point of no return known: anything may land from here

                def progress(n: int) -> None:
                    self.hooks.bytes_sent(sub.route, sub.transport, n)

                result = transport.upload(local, sub.file_name, progress=progress, on_commit=on_commit,
                                          on_ticket=on_ticket)
                late_change = self._check_sent(sub, local, result)
        except StaleEpoch:
            raise
        except UploadUnconfirmed as exc:
            return self._unconfirmed(sub, att, str(exc))
        except CorruptFiling as exc:
            # fileX has bytes that are not the file, as a filing: follow it to FINRA's verdict,
            # and say on the submission that a corrected file must be sent.
            note = (f"a corrupt copy reached fileX and could not be removed ({exc}); FINRA's verdict below is on "
                    "those bytes, not on this file: send a corrected file (drop the file again)")
            log.error("submission %s (%s): %s", sub.id, sub.file_name, note)
            sub = self.store.transition(
                sub.id, State.SUBMITTED, "corrupt copy filed", expect={State.UPLOADING}, epoch=epoch, **_RELEASE,
                upload_location=f"{sub.org}/{sub.application}/in", uploaded_at=utcnow(), reason=note, flag=note,
                tracking_id=None, next_attempt_at=None, move_to=self.archive_dir(sub, "sent"))
            self.store.end_attempt(att.id, Outcome.SENT, f"a corrupt copy was filed: {exc}", epoch=epoch)
            self.hooks.submission_changed(sub, "uploaded")
            return self.finish_move(sub)
        except _Changed:
            self._not_sent(att, epoch, "changed after claim")
            sub = self.store.transition(sub.id, State.QUEUED, "changed after claim", epoch=epoch, **_RELEASE,
                                        reason="the file changed after it was claimed; re-checked before upload",
                                        next_attempt_at=utcnow() + timedelta(seconds=route.stable_seconds))
            return self.validate(sub)
        except RemoteChangedError as exc:
            # The transport discarded what it sent; wait until the file is stable, then send it whole.
            log.warning("submission %s: %s; waiting until the file is stable again", sub.id, exc)
            self._not_sent(att, epoch, f"changed during upload: {exc}")
            sub = self.store.transition(
                sub.id, State.QUEUED, "changed during upload", epoch=epoch, **_RELEASE,
                reason=f"the file changed while it was being uploaded; that upload was discarded ({exc}); "
                       "it is sent again, whole, once it has been stable",
                next_attempt_at=utcnow() + timedelta(seconds=max(route.stable_seconds, 1.0)))
            self.hooks.submission_changed(sub, "retry")
            return self.validate(sub)
        except CredentialsRefused as exc:
            # The login itself was refused: the configured credentials are wrong. Fail fast
            # (one more attempt covers a password rotated between two reads).
            self._not_sent(att, epoch, f"credentials refused: {exc}")
            if sub.attempts < 2:
                return self._requeue(sub, f"credentials refused ({exc}); one more attempt before failing", epoch=epoch)
            return self._fail(sub, path, f"fileX refused the credentials: {exc}", epoch=epoch)
        except AuthError as exc:
            # FIP issued a token and fileX refused it (revoked, or a fileX hiccup): the
            # credentials are valid, so a few more attempts with fresh tokens, then fail.
            self._not_sent(att, epoch, f"token refused: {exc}")
            if sub.attempts < MAX_TOKEN_REFUSALS:
                return self._requeue(sub, f"fileX refused a fresh access token ({exc}); will retry", epoch=epoch)
            return self._fail(sub, path, f"fileX refused {sub.attempts} fresh access tokens in a row: {exc}", epoch=epoch)
        except PermanentError as exc:
            self._not_sent(att, epoch, f"refused: {exc}")
            return self._fail(sub, path, f"fileX refused the upload: {exc}", epoch=epoch)
        except TransientError as exc:
            # The transport's contract: a TransientError (not UploadUnconfirmed) means nothing of
            # this attempt can become a filing at fileX, so another transport may take it.
            self._not_sent(att, epoch, f"failed before anything could land: {exc}")
            nxt = self._fallback(route, sub)
            if nxt is not None:
                was = sub.transport
                sub = self.store.update(sub.id, epoch=epoch, transport=nxt, tracking_id=None)
                return self._requeue(sub, f"{was} unavailable before anything could reach fileX ({exc}); "
                                          f"next attempt over {nxt}", epoch=epoch)
            return self._requeue(sub, f"upload attempt {sub.attempts} failed, will retry: {exc}", epoch=epoch)
        except FileNotFoundError:
            self._not_sent(att, epoch, "the claimed file disappeared")
            return self.store.transition(sub.id, State.FAILED, "lost", epoch=epoch, final_at=utcnow(), **_RELEASE,
                                         reason=f"the claimed file {path} disappeared before upload; nothing was sent")
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            self._not_sent(att, epoch, "the claimed file was replaced by a symbolic link")
            return self._fail(sub, path, "refused: the claimed file was replaced by a symbolic link in the spool; "
                                         "links are never followed or filed; nothing was sent", epoch=epoch)
        except Exception as exc:  # noqa: BLE001 - unknown: retry a few times, then fail, never forever
            log.exception("submission %s: unexpected error during upload", sub.id)
            if committed():
                # The request that can make it a filing may have gone out: only evidence decides.
                return self._unconfirmed(sub, att, f"unexpected error after the upload began: "
                                                   f"{type(exc).__name__}: {exc}")
            self._not_sent(att, epoch, f"unexpected error before anything could land: {type(exc).__name__}")
            if sub.attempts >= MAX_UNEXPECTED:
                return self._fail(sub, path, f"upload failed {sub.attempts} times with an unexpected error: "
                                             f"{type(exc).__name__}: {exc}", epoch=epoch)
            return self._requeue(sub, f"unexpected error, will retry: {type(exc).__name__}: {exc}", epoch=epoch)
        # The attempt's outcome and SUBMITTED in one write, with move_to: a crash right after
        # still files the original.
        sub = self.store.settle(att.id, Outcome.SENT, "uploaded", Transition(
            sub.id, State.SUBMITTED, "uploaded", frozenset({State.UPLOADING}), dict(
                **_RELEASE, tracking_id=result.tracking_id, upload_location=result.upload_location,
                uploaded_at=result.finished_at, reason=integrity_note(sub.reason), flag=late_change,
                next_attempt_at=None, move_to=self.archive_dir(sub, "sent"))), epoch=epoch)
        self.hooks.submission_changed(sub, "uploaded")
        return self.finish_move(sub)

    @staticmethod
    def _check_sent(sub: Submission, local: LocalFile, result) -> str | None:
        """What fileX got must be what was hashed at claim: say so loudly when it is not."""
        problems = []
        if result.sent_sha256 and sub.sha256 and result.sent_sha256 != sub.sha256:
            problems.append(f"the bytes sent (sha256 {result.sent_sha256[:12]}…) differ from the bytes checked at "
                            f"claim (sha256 {sub.sha256[:12]}…): the file was changed behind its size and time; "
                            "fileX has what was sent")
        elif local.changed():
            problems.append("the local file changed after its last byte was sent: fileX has the version checked "
                            "before the upload; the archived copy may differ from it")
        if problems:
            log.error("submission %s: %s: %s", sub.id, local.path, "; ".join(problems))
        return "; ".join(problems) or None

    def _not_sent(self, att: Attempt, epoch: int, detail: str) -> None:
        self.store.end_attempt(att.id, Outcome.NOT_SENT, detail, epoch=epoch)

    def _unconfirmed(self, sub: Submission, att: Attempt, why: str) -> Submission:
        """The answer was lost after the bytes may have landed: the reconciler decides."""
        until = decide_by(self.store, self.config)
        self.store.end_attempt(att.id, Outcome.UNCONFIRMED, why, epoch=sub.epoch, decide_by=until)
        sub = self.store.transition(sub.id, State.UNCONFIRMED, f"unconfirmed: {why}", epoch=sub.epoch, **_RELEASE,
                                    reason=None, flag=unconfirmed_flag(until))
        log.warning("submission %s (%s): %s; not sent again until fileX shows whether it arrived",
                    sub.id, sub.file_name, why)
        self.hooks.submission_changed(sub, "unconfirmed")
        return sub

    @staticmethod
    def _fallback(route: RouteSettings, sub: Submission) -> str | None:
        kinds = route.transports
        if len(kinds) < 2 or sub.transport not in kinds:
            return None
        return kinds[(kinds.index(sub.transport) + 1) % len(kinds)]

    def _requeue(self, sub: Submission, reason: str, epoch: int | None = None) -> Submission:
        net = self.config.network
        delay = min(net.backoff_max * 10, net.backoff_initial * (2 ** min(sub.attempts, 16)))
        delay = random.uniform(delay / 2, delay)  # jitter: many files must not retry in lock-step
        sub = self.store.transition(sub.id, State.QUEUED, "retry", epoch=epoch, reason=reason, tracking_id=None,
                                    **_RELEASE,
                                    next_attempt_at=utcnow() + timedelta(seconds=delay))
        self.hooks.submission_changed(sub, "retry")
        return sub

    def _fail(self, sub: Submission, path: Path, reason: str, epoch: int | None = None,
              expect: State | None = None) -> Submission:
        """Move the file aside to ``failed`` with a reason file; never delete it."""
        route = self.config.route(sub.route)
        failed_dir = route.folder("failed", self.config.agent.data_dir)
        sub = self.store.transition(sub.id, State.FAILED, "failed", epoch=epoch, reason=reason, final_at=utcnow(),
                                    move_to=str(failed_dir), expect=None if expect is None else {expect}, **_RELEASE)
        if os.path.lexists(path):
            dest = move_no_clobber(path, failed_dir)
            apply_perms(dest, self.config.file_perms)
            write_reason(dest, reason, self.config.file_perms)
            sub = self.store.update(sub.id, local_path=str(dest), move_to=None)
        self.hooks.submission_changed(sub, "FAILED")
        return sub

    # -- local archive -------------------------------------------------------------------
    def archive_dir(self, sub: Submission, kind: str) -> str:
        return str(self.config.route(sub.route).folder(kind, self.config.agent.data_dir))

    def file_original(self, sub: Submission, kind: str) -> Submission:
        """Move the original into the route's sent/accepted/rejected folder (journal first)."""
        route = self.config.route(sub.route)
        dest_dir = route.folder(kind, self.config.agent.data_dir)
        sub = self.store.update(sub.id, move_to=str(dest_dir))
        return self.finish_move(sub)

    def finish_move(self, sub: Submission) -> Submission:
        if not sub.move_to:
            return sub
        src = Path(sub.local_path)
        dest_dir = Path(sub.move_to)
        if os.path.lexists(src):
            dest = move_no_clobber(src, dest_dir, sub.file_name)
            apply_perms(dest, self.config.file_perms)
            _remove_empty_spool_dir(src.parent)
            return self.store.update(sub.id, local_path=str(dest), move_to=None)
        # Crash after the move but before the journal update: the file is already there.
        for cand in sorted(dest_dir.glob(f"{Path(sub.file_name).stem}*")):
            if sub.sha256 and cand.is_file() and cand.stat().st_size == sub.size and sha256_file(cand) == sub.sha256:
                forget_move_marker(cand)  # a copy-move cut off after the source went
                return self.store.update(sub.id, local_path=str(cand), move_to=None)
        log.error("submission %s: original %s is missing and not found in %s", sub.id, src, dest_dir)
        return self.store.update(sub.id, move_to=None, flag=f"original file missing (was {src})")


def _private_copy(path: Path) -> None:
    import shutil
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=".filex-copy-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(path, "rb") as inp:
            shutil.copyfileobj(inp, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        shutil.copystat(path, tmp)
        os.replace(tmp, path)  # our own spool name: replacing it drops only our link
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _consume(trigger: Path | None) -> None:
    if trigger is not None:
        try:
            trigger.unlink(missing_ok=True)
        except OSError as exc:  # e.g. a directory of that name: say so, the claim goes on
            log.warning("cannot remove trigger %s: %s", trigger, exc.strerror or exc)


def _remove_empty_spool_dir(d: Path) -> None:
    if d.parent.name == SPOOL:
        try:
            d.rmdir()
        except OSError:
            pass


class _Changed(Exception):
    pass


@dataclass(frozen=True)
class _InSpool:
    sub: Submission


_GONE = object()  # a claim that ended with no submission of this agent's (another agent's claim took it)


class _Checked(NamedTuple):
    size: int
    mtime_ns: int
    sha256: str


class _Earlier(NamedTuple):
    """An earlier file of the same batch with the same content (what a held one names)."""

    id: int
    file_name: str
    state: State


def _held_reason(sub_id: int, sha256: str, earlier: "Submission | _Earlier") -> str:
    return (f"same content (sha256 {sha256[:12]}…) as submission {earlier.id} ({earlier.file_name}, "
            f"{earlier.state}); held, not sent. Run `filex-agent release {sub_id}` to send it anyway.")
