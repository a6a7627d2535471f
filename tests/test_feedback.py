"""Feedback linking: which submission a feedback file in ``out`` belongs to."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from filex_agent.daemon import Daemon
from filex_agent.feedback import link_submission, name_parts
from filex_agent.store import State, utcnow
from filex_agent.store.sqlite import SQLiteStore


def _row(store, name, state, *, uploaded_at=None, tracking_id=None, route="r"):
    sub = store.create(route=route, org="0001", application="app1", transport="rest", file_name=name,
                       source_path=f"/out/{name}", local_path=f"/spool/{name}", state=State.CLAIMING)
    return store.transition(sub.id, state, "test", uploaded_at=uploaded_at, tracking_id=tracking_id)


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(tmp_path / "j.sqlite3")
    yield s
    s.close()


def _link(store, remote_name, modified, route="r"):
    return link_submission(remote_name, modified, store.feedback_candidates(route, name_parts(remote_name)))


def test_only_submissions_that_reached_filex_are_linked(store):
    now = utcnow()
    sent = _row(store, "trades.csv", State.REJECTED, uploaded_at=now - timedelta(hours=1))
    for st in (State.FAILED, State.HELD, State.QUEUED, State.UPLOADING, State.CLAIMING):
        _row(store, "trades.csv", st)  # newer ids, never (or not yet) at fileX
    assert _link(store, "trades_feedback.txt", now) == sent


def test_yesterdays_late_feedback_is_not_given_to_todays_file(store):
    now = utcnow()
    yesterday = _row(store, "daily.csv", State.REJECTED, uploaded_at=now - timedelta(days=1))
    today = _row(store, "daily.csv", State.SUBMITTED, uploaded_at=now + timedelta(minutes=10))
    late = now  # the feedback file appeared before today's upload
    assert _link(store, "daily.csv.feedback.txt", late) == yesterday
    # Feedback that appeared after today's upload is today's (the most recent before it).
    assert _link(store, "daily.csv.feedback.txt", now + timedelta(minutes=20)) == today


def test_tracking_id_in_the_name_wins_over_the_stem(store):
    now = utcnow()
    tid = str(uuid.uuid4())
    old = _row(store, "book.csv", State.ACCEPTED, uploaded_at=now - timedelta(days=2), tracking_id=tid)
    _row(store, "book.csv", State.ACCEPTED, uploaded_at=now - timedelta(hours=1), tracking_id=str(uuid.uuid4()))
    assert _link(store, f"book_{tid}_feedback.txt", now) == old


def test_stem_is_matched_as_a_whole_part_and_the_longest_wins(store):
    now = utcnow() - timedelta(hours=1)
    one = _row(store, "report_1.csv", State.ACCEPTED, uploaded_at=now)
    twelve = _row(store, "report_12.csv", State.ACCEPTED, uploaded_at=now)
    v2 = _row(store, "report_12_v2.csv", State.ACCEPTED, uploaded_at=now)
    assert _link(store, "report_12_fb.txt", None) == twelve
    assert _link(store, "report_1_fb.txt", None) == one
    assert _link(store, "report_12_v2_fb.txt", None) == v2
    assert _link(store, "xreport_1x.txt", None) is None


def test_lookup_uses_the_indexes_not_a_scan(store):
    """Proportional to the candidates: both lookups are index searches, whatever the history."""
    from filex_agent.store.sqlite import STEM_SQL

    plans = [" ".join(str(r[3]) for r in store._db.execute(f"EXPLAIN QUERY PLAN {q}", a)) for q, a in (
        (f"SELECT * FROM submissions WHERE route = ? AND {STEM_SQL} IN (?) AND state IN ('ACCEPTED')", ["r", "x"]),
        ("SELECT * FROM submissions WHERE tracking_id IS NOT NULL AND tracking_id IN (?) AND route = ? "
         "AND state IN ('ACCEPTED')", ["x", "r"]))]
    assert "USING INDEX submissions_route_stem" in plans[0]
    assert "USING INDEX submissions_tracking" in plans[1]


def test_collector_links_late_feedback_to_the_submission_it_belongs_to(sandbox, sandbox_config):
    """Through the real collector and sandbox: yesterday's REJECTED file, today's resubmission of
    the same name held or uploaded after the feedback appeared; the feedback is yesterday's."""
    cfg = sandbox_config(transports=("rest",))
    route = cfg.routes[0]
    d = Daemon(cfg)
    try:
        name = f"LATE_{uuid.uuid4().hex[:8]}.csv"
        now = utcnow()
        yesterday = _row(d.store, name, State.REJECTED, uploaded_at=now - timedelta(days=1), route=route.name)
        _row(d.store, name, State.HELD, route=route.name)
        _row(d.store, name, State.FAILED, route=route.name)
        _row(d.store, name, State.SUBMITTED, uploaded_at=now + timedelta(minutes=5), route=route.name)
        stem = Path(name).stem
        sandbox.admin_s3.put_object(Bucket=sandbox.bucket, Body=b"late feedback\n",
                                    Key=f"{route.org}/{route.application}/out/{stem}_feedback.txt")
        d.feedback.collect(route)
        linked = [s.id for s in d.store.list(route=route.name) if d.store.feedback_for(s.id)
                  and s.file_name == name]
        assert linked == [yesterday.id]
    finally:
        d.stop(grace=0)


def test_feedback_filed_meanwhile_by_another_process_is_not_fatal(sandbox, sandbox_config, monkeypatch, caplog):
    """record_feedback's conflict (FeedbackAlreadyFiled, not sqlite3's IntegrityError) is caught:
    logged, the duplicate copy removed, and the cycle goes on with the other files."""
    from filex_agent.transports.rest import RestTransport

    cfg = sandbox_config(transports=("rest",))
    route = cfg.routes[0]
    tag = uuid.uuid4().hex[:8]
    raced, other = f"RACE_{tag}_a.txt", f"RACE_{tag}_b.txt"
    for n in (raced, other):
        sandbox.admin_s3.put_object(Bucket=sandbox.bucket, Body=n.encode(),
                                    Key=f"{route.org}/{route.application}/out/{n}")
    folder = route.folder("feedback", cfg.agent.data_dir)
    d = Daemon(cfg)
    second = SQLiteStore(cfg.journal_path)  # another process on the same journal
    real = RestTransport.download_feedback

    def download(self, name, dest, progress=None):
        n = real(self, name, dest, progress)
        if name == raced:  # the other process files it while this one downloads it
            entry = next(f for f in self.list_feedback() if f.name == name)
            (folder / "theirs.txt").write_bytes(name.encode())
            second.record_feedback(route.name, name, entry.size, entry.modified.isoformat(),
                                   str(folder / "theirs.txt"), None)
        return n

    monkeypatch.setattr(RestTransport, "download_feedback", download)
    try:
        caplog.set_level("WARNING", logger="filex_agent.feedback")
        d.feedback.collect(route)  # no exception escapes
        mine = sorted(p.name for p in folder.iterdir() if tag in p.name or p.name == "theirs.txt")
        assert mine == [other, "theirs.txt"]  # the raced file once (theirs), the other one filed
        assert [r for r in caplog.records if raced in r.getMessage() and "filed already" in r.getMessage()]
        assert d.feedback.collect(route) == 0  # and not tried again
    finally:
        second.close()
        d.stop(grace=0)
