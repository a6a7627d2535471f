"""Submitter decisions on classified errors, with a scripted transport."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from filex_agent.config import parse_config
from filex_agent.errors import AuthError, CredentialsRefused, TransientError
from filex_agent.hooks import Hooks
from filex_agent.store import State
from filex_agent.store.sqlite import SQLiteStore
from filex_agent.submitter import Submitter
from filex_agent.transports import UploadResult


class Scripted:
    """Raises the scripted errors in turn, then succeeds."""

    reports_commit = False  # no finer point of no return: anything may land from the first byte

    def __init__(self, errors, sent_sha256=None):
        self.errors = list(errors)
        self.uploads = 0
        self.sent_sha256 = sent_sha256  # what the transport reports it sent (None: not known)

    def transport(self, route, kind=None):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def upload(self, path, name, progress=None, *, on_commit=None, on_ticket=None):
        if self.errors:
            raise self.errors.pop(0)
        self.uploads += 1
        now = datetime.now(timezone.utc)
        return UploadResult(name, "0001/app1/in", path.stat().st_size, now, now, tracking_id=f"t{self.uploads}",
                            sent_sha256=self.sent_sha256)


@pytest.fixture
def make(tmp_path):
    def _make(errors, **kw):
        cfg = parse_config({"agent": {"data_dir": str(tmp_path / "d")},
                            "credentials": {"c": {"client_id": "x", "client_secret": "env:X"}},
                            "routes": [{"name": "r", "outbox": str(tmp_path / "out"), "org": "0001",
                                        "application": "app1", "credential": "c"}]})
        conns = Scripted(errors, **kw)
        sub = Submitter(cfg, SQLiteStore(tmp_path / "j.sqlite3"), conns, Hooks())
        out = tmp_path / "out"
        out.mkdir(exist_ok=True)
        f = out / "F.csv"
        f.write_bytes(b"data\n")
        return sub, sub.claim(cfg.routes[0], f), conns
    return _make


def run_until_settled(sub, s, limit=10):
    for _ in range(limit):
        s = sub.upload(s.id)
        if s.state is not State.QUEUED:
            return s
    return s


def test_fresh_tokens_refused_by_filex_are_retried_not_failed(make):
    sub, s, conns = make([AuthError("401 from fileX"), AuthError("401 from fileX"), AuthError("401")])
    s = run_until_settled(sub, s)
    assert s.state is State.SUBMITTED and conns.uploads == 1


def test_refused_login_fails_fast_with_the_reason(make):
    sub, s, conns = make([CredentialsRefused("FIP token refused: HTTP 401")] * 5)
    s = run_until_settled(sub, s)
    assert s.state is State.FAILED and s.attempts == 2
    assert "refused the credentials" in s.reason and conns.uploads == 0
    assert Path(s.local_path).with_name("F.csv.reason.txt").is_file()


def test_transient_errors_leave_the_file_queued_with_the_reason(make):
    sub, s, conns = make([TransientError("HTTP 503 from fileX")] * 3)
    s = sub.upload(s.id)
    assert s.state is State.QUEUED and "503" in s.reason and s.next_attempt_at is not None


def test_trigger_is_consumed_when_the_file_vanished_or_a_claim_is_finished_by_recovery(tmp_path):
    cfg = parse_config({"agent": {"data_dir": str(tmp_path / "d")},
                        "credentials": {"c": {"client_id": "x", "client_secret": "env:X"}},
                        "routes": [{"name": "r", "outbox": str(tmp_path / "out"), "org": "0001",
                                    "application": "app1", "credential": "c", "readiness": "trigger"}]})
    route = cfg.routes[0]
    store = SQLiteStore(tmp_path / "j.sqlite3")
    sub = Submitter(cfg, store, Scripted([]), Hooks())
    out = tmp_path / "out"
    out.mkdir()
    # Vanished before the claim: the trigger goes too, or it would release the next a.csv.
    (out / "a.csv.done").touch()
    assert sub.claim(route, out / "a.csv", out / "a.csv.done") is None
    assert not (out / "a.csv.done").exists()
    # A claim cut off before the rename, finished by recovery (which does not know the trigger).
    (out / "b.csv").write_bytes(b"b\n")
    (out / "b.csv.done").touch()
    row = store.create(route="r", org="0001", application="app1", transport="rest", file_name="b.csv",
                       source_path=str(out / "b.csv"), local_path=str(out / "b.csv"), state=State.CLAIMING)
    assert sub.complete_claim(row).state is State.QUEUED
    assert sorted(p.name for p in out.iterdir()) == [".filex-agent"]
    store.close()


def test_bytes_sent_other_than_those_hashed_at_claim_are_flagged(make):
    """Size and time can be faked (utime): what the transport hashed as it sent is compared with
    the claim's hash, and a difference is said on the submission."""
    import hashlib

    sub, s, _ = make([], sent_sha256=hashlib.sha256(b"other\n").hexdigest())
    s = sub.upload(s.id)
    assert s.state is State.SUBMITTED and "differ from the bytes checked at claim" in s.flag
    sub2, s2, _ = make([], sent_sha256=hashlib.sha256(b"data\n").hexdigest())
    assert sub2.upload(s2.id).flag is None


def test_a_symlink_swapped_into_the_spool_is_never_followed(make, tmp_path):
    sub, s, conns = make([])
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"credentials\n")
    local = Path(s.local_path)
    local.unlink()
    local.symlink_to(secret)
    s = sub.upload(s.id)
    assert s.state is State.FAILED and "symbolic link" in s.reason and conns.uploads == 0


def test_a_corrupt_copy_that_could_not_be_removed_is_followed_and_said(make):
    from filex_agent.errors import CorruptFiling

    sub, s, conns = make([CorruptFiling("s3://b/0001/app1/in/F.csv failed its integrity check and could not "
                                        "be deleted")])
    s = sub.upload(s.id)
    assert s.state is State.SUBMITTED and conns.uploads == 0
    assert s.reason.startswith("a corrupt copy reached fileX") and "send a corrected file" in s.reason
    assert [a.outcome.value for a in sub.store.attempts(s.id)] == ["SENT"]


def test_a_batch_of_claims_costs_two_journal_writes_and_holds_duplicates_within_it(tmp_path):
    cfg = parse_config({"agent": {"data_dir": str(tmp_path / "d")},
                        "credentials": {"c": {"client_id": "x", "client_secret": "env:X"}},
                        "routes": [{"name": "r", "outbox": str(tmp_path / "out"), "org": "0001",
                                    "application": "app1", "credential": "c"}]})
    route = cfg.routes[0]
    store = SQLiteStore(tmp_path / "j.sqlite3")
    sub = Submitter(cfg, store, Scripted([]), Hooks())
    out = tmp_path / "out"
    out.mkdir()
    files = []
    for i in range(50):
        p = out / f"f{i:02d}.csv"
        p.write_bytes(b"same\n" if i in (3, 7) else b"%d\n" % i)
        files.append((p, None))
    (out / "empty.csv").touch()
    files.append((out / "empty.csv", None))
    files.append((out / "gone.csv", None))  # vanished before the claim: nothing journaled
    before = store._group.syncs
    claimed = sub.claim_many(route, files)
    # One write for the 51 CLAIMING rows, one for their verdicts; the empty file's refusal (FAILED,
    # then where it was moved) is two of its own: 4, not several per file.
    assert store._group.syncs - before == 4
    by_name = {s.file_name: s for s in claimed}
    assert len(by_name) == 51 and "gone.csv" not in by_name
    assert by_name["f03.csv"].state is State.QUEUED and by_name["f03.csv"].sha256
    held = by_name["f07.csv"]
    assert held.state is State.HELD and held.held_by == by_name["f03.csv"].id
    assert f"release {held.id}" in held.reason
    assert by_name["empty.csv"].state is State.FAILED and "empty" in by_name["empty.csv"].reason
    assert all(s.state is State.QUEUED for n, s in by_name.items() if n not in ("f07.csv", "empty.csv"))
    q = by_name["f10.csv"]
    assert Path(q.local_path).read_bytes() == b"10\n" and q.owner is None
    assert [e.state for e in store.events(held.id)] == ["CLAIMING", "QUEUED", "HELD"]
    assert sorted(p.name for p in out.iterdir()) == [".filex-agent"]
    store.close()
