"""The journal's conformance suite: every test runs against SQLite and PostgreSQL (``journal``
opens the test's journal; calling it again is a reopen, or a second node on the same journal)."""

import sqlite3
import threading
import time

import pytest

from filex_agent.store import (Duplicate, FeedbackAlreadyFiled, Outcome, SchemaTooNew, StaleEpoch, State,
                               StateConflict)
from filex_agent.store.sqlite import SQLiteStore


def _new(store, **kw):
    name = kw.get("file_name", "a.csv")
    base = dict(route="r", org="0001", application="app1", transport="rest", file_name=name,
                source_path=f"/o/{name}", local_path=f"/o/{name}")
    base.update(kw)
    return store.create(**base)


def _begin(store, sub_id, owner="me", lease=5.0):
    return store.begin_upload(sub_id, owner, lease, transport="rest", remote_name="a.csv",
                              upload_location="0001/app1/in")


def test_transitions_are_journaled_and_survive_reopen(journal):
    s = journal()
    sub = _new(s)
    assert sub.state is State.CLAIMING and sub.org == "0001"
    s.transition(sub.id, State.QUEUED, "claimed", expect={State.CLAIMING})
    s.transition(sub.id, State.UPLOADING, "upload started")
    s.transition(sub.id, State.SUBMITTED, "uploaded", tracking_id="t-1")
    s.close()
    s = journal()
    sub = s.get(sub.id)
    assert sub.state is State.SUBMITTED and sub.tracking_id == "t-1"
    assert [e.state for e in s.events(sub.id)] == ["CLAIMING", "QUEUED", "UPLOADING", "SUBMITTED"]
    assert s.list([State.SUBMITTED])[0].id == sub.id
    assert s.list([State.QUEUED]) == []
    assert sub.created_at.tzinfo is not None and sub.updated_at >= sub.created_at


def test_compare_and_set_refuses_a_stale_transition(journal):
    s = journal()
    sub = _new(s, state=State.QUEUED)
    s.transition(sub.id, State.UPLOADING, expect={State.QUEUED})
    with pytest.raises(StateConflict):
        s.transition(sub.id, State.UPLOADING, expect={State.QUEUED})
    with pytest.raises(KeyError):
        s.get(sub.id + 1000)


def test_only_one_of_many_threads_wins_the_claim(journal):
    s = journal()
    sub = _new(s, state=State.QUEUED)
    wins = []

    def go():
        try:
            s.transition(sub.id, State.UPLOADING, expect={State.QUEUED})
            wins.append(1)
        except StateConflict:
            pass

    threads = [threading.Thread(target=go) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(wins) == 1


def test_nodes_racing_begin_upload_share_the_rows_each_exactly_once(journal):
    """Four nodes (own handles: own connections) race for the same due rows: every row is begun
    exactly once, the losers see StateConflict, and nothing else."""
    first = journal()
    ids = [_new(first, file_name=f"f{i}.csv", state=State.QUEUED).id for i in range(30)]
    nodes = [first] + [journal() for _ in range(3)]
    won: dict[str, list[int]] = {f"n{i}": [] for i in range(len(nodes))}
    errors: list[BaseException] = []
    start = threading.Barrier(len(nodes))

    def node(name, store):
        start.wait()
        try:
            while True:
                due = store.due(store.now(), 10)
                if not due:
                    return
                for sub_id in due:
                    try:
                        _begin(store, sub_id, owner=f"{name}:1:x")
                        won[name].append(sub_id)
                    except StateConflict:
                        pass
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=node, args=(f"n{i}", st)) for i, st in enumerate(nodes)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert not errors
    claimed = sorted(i for lst in won.values() for i in lst)
    assert claimed == ids  # each exactly once
    for sub_id in ids:
        assert [a.n for a in first.attempts(sub_id)] == [1]
        assert first.get(sub_id).state is State.UPLOADING


def test_same_content_lookup(journal):
    s = journal()
    a = _new(s, sha256="x", state=State.ACCEPTED)
    b = _new(s, sha256="x", state=State.QUEUED)
    assert s.find_same_content("0001", "app1", "x", exclude_id=b.id).id == a.id
    s.transition(a.id, State.REJECTED)
    assert s.find_same_content("0001", "app1", "x", exclude_id=b.id) is None
    assert s.find_same_content("0002", "app1", "x", exclude_id=0) is None


def test_tracking_ids_are_unique(journal):
    s = journal()
    _new(s, tracking_id="t")
    with pytest.raises(Duplicate):
        _new(s, file_name="c.csv", tracking_id="t")
    other = _new(s, file_name="b.csv")
    with pytest.raises(Duplicate):
        s.transition(other.id, State.SUBMITTED, tracking_id="t")
    assert s.get(other.id).state is State.CLAIMING  # the refused transition left nothing behind
    assert [e.state for e in s.events(other.id)] == ["CLAIMING"]


def test_feedback_recorded_once(journal):
    s = journal()
    sub = _new(s)
    assert not s.feedback_seen("r", "f.txt", 10, "2025-01-01")
    s.record_feedback("r", "f.txt", 10, "2025-01-01", "/fb/f.txt", sub.id)
    assert s.feedback_seen("r", "f.txt", 10, "2025-01-01")
    assert not s.feedback_seen("r", "f.txt", 11, "2025-01-01")
    with pytest.raises(FeedbackAlreadyFiled) as caught:  # the store's conflict, not SQLite's
        s.record_feedback("r", "f.txt", 10, "2025-01-01", "/fb/f~1.txt", sub.id)
    assert caught.value.local_path == "/fb/f.txt" and not isinstance(caught.value, sqlite3.Error)
    assert [f.local_path for f in s.feedback_for(sub.id)] == ["/fb/f.txt"]


def test_feedback_write_ahead_and_keys(journal):
    s = journal()
    s.begin_feedback("r", "a.txt", None, None)
    s.begin_feedback("r", "a.txt", None, None)  # again (a retry after a crash): still one row
    s.begin_feedback("r", "b.txt", 5, "m")
    s.record_feedback("r", "b.txt", 5, "m", "/fb/b.txt", None)
    assert s.feedback_keys("r") == ({("b.txt", 5, "m")}, {("a.txt", None, None)})
    assert not s.feedback_seen("r", "a.txt", None, None)
    s.record_feedback("r", "a.txt", None, None, "/fb/a.txt", None)
    assert s.feedback_seen("r", "a.txt", None, None)
    assert s.feedback_keys("other") == (set(), set())


def test_unknown_field_is_an_error(journal):
    s = journal()
    sub = _new(s)
    with pytest.raises(KeyError):
        s.update(sub.id, nonsense=1)


def test_count_per_route_without_listing(journal):
    s = journal()
    for i in range(3):
        _new(s, route="a", file_name=f"a{i}.csv", state=State.QUEUED)
    _new(s, route="a", file_name="up.csv", state=State.UPLOADING)
    _new(s, route="b", file_name="b.csv", state=State.QUEUED)
    _new(s, route="c", file_name="c.csv", state=State.FAILED)
    assert s.count([State.QUEUED]) == {"a": 3, "b": 1}
    assert s.count([State.QUEUED, State.UPLOADING], route="a") == {"a": 4}
    assert s.count([State.QUEUED], route="c") == {}
    assert [x.file_name for x in s.list([State.QUEUED], route="a")] == ["a0.csv", "a1.csv", "a2.csv"]


def test_due_is_oldest_first_and_respects_next_attempt(journal):
    s = journal()
    now = s.now()
    a = _new(s, file_name="a.csv", state=State.QUEUED)
    b = _new(s, file_name="b.csv", state=State.QUEUED)
    later = _new(s, file_name="c.csv", state=State.QUEUED)
    s.update(later.id, next_attempt_at=now.replace(year=now.year + 1))
    _new(s, file_name="d.csv", state=State.HELD)
    assert s.due(s.now(), 10) == [a.id, b.id]
    assert s.due(s.now(), 1) == [a.id]


def test_attempts_leases_and_fencing(journal):
    st = journal()
    s = _new(st, state=State.QUEUED)
    sub, att = _begin(st, s.id)
    assert sub.state is State.UPLOADING and sub.epoch == 1 and att.n == 1 and att.outcome is Outcome.PENDING
    assert sub.lease_until > st.now()
    with pytest.raises(StateConflict):  # owned: nobody else may start it
        _begin(st, s.id)
    st.set_ticket(att.id, 1, "T1")
    a = st.commit_attempt(att.id, 1)
    assert a.may_have_landed and a.tracking_id == "T1" and st.get(s.id).tracking_id == "T1"
    assert st.renew_leases("me", 5) == {s.id}
    assert st.expired_leases() == []
    with pytest.raises(StateConflict):  # the lease is live
        st.take_over(s.id, "other")
    st.take_over(s.id, "other", force=True)
    # The old owner is fenced off: none of its writes land.
    with pytest.raises(StaleEpoch):
        st.transition(s.id, State.SUBMITTED, epoch=1)
    with pytest.raises(StaleEpoch):
        st.commit_attempt(att.id, 1)
    with pytest.raises(StaleEpoch):
        st.update(s.id, epoch=1, flag="x")
    with pytest.raises(StaleEpoch):
        st.end_attempt(att.id, Outcome.SENT, epoch=1)
    assert st.get(s.id).state is State.UPLOADING and st.get(s.id).flag is None
    st.end_attempt(att.id, Outcome.UNCONFIRMED, "lost")
    assert [x.id for x in st.unconfirmed()] == [att.id]
    assert st.attempts(s.id)[0].ended_at is None  # unconfirmed is not an end
    st.transition(s.id, State.QUEUED, epoch=2, owner=None, lease_until=None)
    with pytest.raises(StateConflict):  # never sent again while an attempt is unconfirmed
        _begin(st, s.id)
    st.end_attempt(att.id, Outcome.NOT_SENT, "no evidence")
    assert st.unconfirmed() == [] and st.attempts(s.id)[0].ended_at is not None
    sub, att2 = _begin(st, s.id)
    assert att2.n == 2 and sub.epoch == 3 and sub.attempts == 2


def test_a_stale_epoch_is_refused_across_nodes(journal):
    """Node A's lease expires, node B takes the row over: A's writes, through its own handle, fail."""
    a, b = journal(), journal()
    s = _new(a, state=State.QUEUED)
    sub, att = _begin(a, s.id, owner="A:1:x", lease=0.2)
    time.sleep(0.4)
    assert [x.id for x in b.expired_leases()] == [s.id]
    taken = b.take_over(s.id, "B:1:y")
    assert taken.epoch == sub.epoch + 1
    with pytest.raises(StaleEpoch):
        a.commit_attempt(att.id, sub.epoch)
    with pytest.raises(StaleEpoch):
        a.transition(s.id, State.SUBMITTED, epoch=sub.epoch)
    assert a.attempts(s.id)[0].committed_at is None


def test_expired_lease_is_found_and_taken_over(journal):
    st = journal()
    s = _new(st, state=State.QUEUED)
    _begin(st, s.id, owner="dead", lease=0.05)
    time.sleep(0.1)
    assert [x.id for x in st.expired_leases()] == [s.id]
    assert st.renew_leases("dead", 5) == set()  # an expired lease is not renewed: it is lost
    assert [x.id for x in st.expired_leases()] == [s.id]
    taken = st.take_over(s.id, "rescuer")
    assert taken.owner == "rescuer" and taken.epoch == 2
    st.transition(s.id, State.QUEUED, "settled by the rescuer", epoch=2, owner=None, lease_until=None)
    with pytest.raises(StateConflict):  # a second rescuer, late: the row is settled already
        st.take_over(s.id, "rescuer-2")
    assert st.get(s.id).epoch == 2


def test_one_leader_at_a_time_and_failover_after_the_lease(journal):
    a, b = journal(), journal()
    assert a.try_lead("tracking", "A:1:x", 0.3)
    assert not b.try_lead("tracking", "B:1:y", 0.3)
    assert a.try_lead("tracking", "A:1:x", 0.3)  # renewal keeps it
    assert b.try_lead("feedback", "B:1:y", 30)  # another singleton, another leader
    epoch = a.leaders()["tracking"].epoch
    time.sleep(0.5)  # A stopped renewing (dead, paused): B takes over once the lease ran out
    assert b.try_lead("tracking", "B:1:y", 30)
    assert not a.try_lead("tracking", "A:1:x", 30)
    lead = a.leaders()["tracking"]
    assert lead.owner == "B:1:y" and lead.epoch == epoch + 1
    b.resign("feedback", "B:1:y")  # a clean stop hands over at once
    assert a.try_lead("feedback", "A:1:x", 30)


def test_exactly_one_leader_among_racing_nodes(journal):
    stores = [journal() for _ in range(4)]
    results: dict[int, bool] = {}
    start = threading.Barrier(len(stores))

    def go(i):
        start.wait()
        results[i] = stores[i].try_lead("alerts", f"n{i}:1:x", 30)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(stores))]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert sorted(results.values()) == [False, False, False, True]


def test_node_registry_shows_holds_and_leads(journal):
    st = journal()
    st.heartbeat_node("alpha", {"pid": 1, "version": "0.1.0"})
    st.heartbeat_node("beta", {"pid": 2})
    s1 = _new(st, file_name="a.csv", state=State.QUEUED)
    s2 = _new(st, file_name="b.csv", state=State.QUEUED)
    _begin(st, s1.id, owner="alpha:1:x")
    _begin(st, s2.id, owner="alpha_x:9:y")  # another node whose name merely starts alike
    assert st.try_lead("tracking", "alpha:1:x", 30)
    first = {n.node: n for n in st.nodes()}
    time.sleep(0.02)
    st.heartbeat_node("alpha", {"pid": 3})
    nodes = {n.node: n for n in st.nodes()}
    assert set(nodes) == {"alpha", "beta"}
    assert nodes["alpha"].holds == 1 and nodes["alpha"].leads == ["tracking"] and nodes["alpha"].info == {"pid": 3}
    assert nodes["beta"].holds == 0 and nodes["beta"].leads == []
    assert nodes["alpha"].heartbeat_at > first["alpha"].heartbeat_at
    assert nodes["alpha"].started_at == first["alpha"].started_at


def test_a_newer_journal_refuses_an_older_agent(journal, monkeypatch):
    import filex_agent.store as store_pkg

    st = journal()
    assert st.schema_version() == store_pkg.SCHEMA_VERSION
    st.close()
    # This "build" knows one version less than the journal has.
    older = store_pkg.SCHEMA_VERSION - 1
    monkeypatch.setattr("filex_agent.store.sqlite.SCHEMA_VERSION", older)
    monkeypatch.setattr("filex_agent.store.postgres.SCHEMA_VERSION", older)
    with pytest.raises(SchemaTooNew, match=f"schema version {older + 1}.*up to {older}"):
        journal()


def test_old_journal_gains_the_new_columns(tmp_path):
    import sqlite3

    from filex_agent.store.sqlite import SQLiteStore

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("""CREATE TABLE submissions (id INTEGER PRIMARY KEY AUTOINCREMENT, route TEXT NOT NULL,
        org TEXT NOT NULL, application TEXT NOT NULL, transport TEXT NOT NULL, file_name TEXT NOT NULL,
        source_path TEXT NOT NULL, local_path TEXT NOT NULL, state TEXT NOT NULL, size INTEGER, mtime_ns INTEGER,
        sha256 TEXT, reason TEXT, tracking_id TEXT, upload_location TEXT, remote_status TEXT,
        downstream_status TEXT, move_to TEXT, attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at TEXT,
        created_at TEXT NOT NULL, updated_at TEXT NOT NULL, upload_started_at TEXT, uploaded_at TEXT,
        final_at TEXT, held_by INTEGER, flag TEXT);
        INSERT INTO submissions (route, org, application, transport, file_name, source_path, local_path, state,
        created_at, updated_at) VALUES ('r', '0001', 'app1', 'rest', 'a.csv', '/o', '/o', 'UPLOADING',
        '2026-01-01T00:00:00+00:00', '2026-01-01T00:00:00+00:00');""")
    db.commit()
    db.close()
    st = SQLiteStore(path)
    sub = st.get(1)
    assert sub.state is State.UPLOADING and sub.epoch == 0 and sub.owner is None
    # The interrupted REST upload had no tracking id: no byte can have left, so not committed.
    (att,) = st.attempts(1)
    assert att.remote_name == "a.csv" and att.upload_location == "0001/app1/in" and not att.may_have_landed
    assert SQLiteStore(path).attempts(1) == [att]  # once


def test_one_claim_per_outbox_file_and_the_loser_lets_go(journal):
    a, b = journal(), journal()
    mine = _new(a, source_path="/o/x.csv", local_path="/o/x.csv")
    with pytest.raises(Duplicate):  # another agent claiming the same file at the same time
        _new(b, source_path="/o/x.csv", local_path="/o/x.csv")
    a.transition(mine.id, State.QUEUED, "claimed", local_path="/spool/1/x.csv")
    # A slower agent saw the file before it left and claims it after: its rename finds nothing.
    late = _new(b, source_path="/o/x.csv", local_path="/o/x.csv")
    assert b.discard_claim(late.id)
    with pytest.raises(KeyError):
        b.get(late.id)
    assert [s.id for s in b.list()] == [mine.id]
    # A file that vanished with no other claim is not discarded (the caller records why).
    alone = _new(b, source_path="/o/gone.csv", local_path="/o/gone.csv")
    assert not b.discard_claim(alone.id)
    assert not b.discard_claim(mine.id)  # not CLAIMING
    assert b.get(alone.id).state is State.CLAIMING


def test_calendar_occurrences_and_alerts(journal):
    from datetime import datetime, timedelta, timezone

    from filex_agent.store import Occurrence

    s = journal()
    d1 = datetime(2026, 12, 1, 21, 0, tzinfo=timezone.utc)
    d2 = d1 + timedelta(days=1)

    def occ(deadline, **kw):
        return Occurrence(expectation="daily", deadline=deadline, opens_at=deadline - timedelta(hours=8),
                          closes_at=deadline + timedelta(hours=1), route="r", pattern="*.csv",
                          label=deadline.date().isoformat(), **{"state": "EXPECTED", **kw})

    s.save_occurrence(occ(d1))
    s.save_occurrence(occ(d2))
    s.save_occurrence(occ(d1, on_time=True, submission_id=7, verdict="ACCEPTED", closed=True, state="ACCEPTED"))
    got = s.occurrences("daily")
    assert [(o.deadline, o.state, o.closed, o.on_time) for o in got] == [(d1, "ACCEPTED", True, True),
                                                                          (d2, "EXPECTED", False, None)]
    assert [o.deadline for o in s.occurrences(open_only=True)] == [d2]
    assert [o.deadline for o in s.occurrences(since=d2)] == [d2] and s.occurrences(until=d1) == []
    assert s.last_occurrence("daily").deadline == d2 and s.last_occurrence("other") is None
    s.record_calendar_alert("daily", d2, "LATE", d2)
    s.record_calendar_alert("daily", d2, "LATE", d2 + timedelta(minutes=5))
    s.clear_calendar_alert("daily", d2, "LATE", d2 + timedelta(minutes=6))
    (alert,) = s.calendar_alerts("daily", d2).values()
    assert (alert.kind, alert.sent_count, alert.first_sent_at, alert.last_sent_at, alert.cleared_at) == (
        "LATE", 2, d2, d2 + timedelta(minutes=5), d2 + timedelta(minutes=6))
    sub = _new(s, route="r")
    assert [x.id for x in s.list_created("r", sub.created_at, sub.created_at + timedelta(seconds=1))] == [sub.id]
    assert s.list_created("r", sub.created_at + timedelta(seconds=1), sub.created_at + timedelta(seconds=2)) == []


def test_feedback_key_time_is_the_utc_second_whatever_the_transport_wrote():
    from datetime import datetime, timezone

    from filex_agent.store import feedback_instant

    same = ["2025-08-22T17:29:58.000-04:00", "2025-08-22T17:29:58.999-04:00", "2025-08-22 21:29:58+00:00",
            "2025-08-22T21:29:58Z", datetime(2025, 8, 22, 21, 29, 58, 500000, tzinfo=timezone.utc),
            datetime.fromtimestamp(1755898198, timezone.utc)]
    assert {feedback_instant(v) for v in same} == {"2025-08-22T21:29:58Z"}
    assert feedback_instant(None) is None and feedback_instant("not a time") == "not a time"


def test_older_feedback_rows_are_normalised_when_the_journal_is_opened(tmp_path):
    import sqlite3

    s = SQLiteStore(tmp_path / "j.sqlite3")
    s.record_feedback("r", "a.txt", 5, "2025-08-22T21:29:58Z", "/fb/a.txt", None)
    s.close()
    with sqlite3.connect(tmp_path / "j.sqlite3") as db:  # as an older agent wrote it, over REST
        db.execute("UPDATE feedback SET remote_modified = '2025-08-22T17:29:58-04:00'")
    db.close()
    s = SQLiteStore(tmp_path / "j.sqlite3")
    assert s.feedback_keys("r") == ({("a.txt", 5, "2025-08-22T21:29:58Z")}, set())
    assert s.feedback_seen("r", "a.txt", 5, "2025-08-22T21:29:58.000+00:00")
    s.close()


def test_feedback_times_are_one_key_whatever_the_transport_wrote(journal):
    s = journal()
    s.begin_feedback("r", "a.txt", 5, "2025-08-22T17:29:58.000-04:00")  # REST's spelling
    assert s.feedback_keys("r") == (set(), {("a.txt", 5, "2025-08-22T21:29:58Z")})
    s.record_feedback("r", "a.txt", 5, "2025-08-22 21:29:58+00:00", "/fb/a.txt", None)  # S3's
    assert s.feedback_seen("r", "a.txt", 5, "2025-08-22T21:29:58Z")
    with pytest.raises(FeedbackAlreadyFiled):
        s.record_feedback("r", "a.txt", 5, "2025-08-22T21:29:58.9Z", "/fb/a~1.txt", None)
    assert s.feedback_keys("r") == ({("a.txt", 5, "2025-08-22T21:29:58Z")}, set())


def test_feedback_candidates_by_tracking_id_or_stem(journal):
    s = journal()
    a = _new(s, file_name="REPORT.csv", state=State.SUBMITTED, tracking_id="t-a")
    b = _new(s, file_name="arch.tar.gz", state=State.ACCEPTED, tracking_id="t-b")
    _new(s, file_name="REPORT.txt", state=State.QUEUED)  # fileX has not got it: never a candidate
    c = _new(s, file_name=".rc", state=State.REJECTED)
    _new(s, route="other", file_name="REPORT.csv", state=State.SUBMITTED, tracking_id="t-x")
    assert [x.id for x in s.feedback_candidates("r", ["REPORT", "zzz"])] == [a.id]
    assert [x.id for x in s.feedback_candidates("r", ["arch.tar", "t-a"])] == [a.id, b.id]
    assert [x.id for x in s.feedback_candidates("r", [".rc"])] == [c.id]
    assert s.feedback_candidates("r", []) == []
    # Its owner died after the PUT; fileX's feedback may come before the reconciler decides.
    u = _new(s, file_name="LATE.csv", state=State.UNCONFIRMED)
    assert [x.id for x in s.feedback_candidates("r", ["LATE"])] == [u.id]


def test_each_alert_is_journaled_once(journal):
    s = journal()
    rej = _new(s, file_name="a.csv", state=State.REJECTED)
    part = _new(s, file_name="b.csv", state=State.PARTIALLY_REJECTED)
    assert [x.id for x in s.unalerted([State.REJECTED, State.PARTIALLY_REJECTED])] == [rej.id, part.id]
    assert s.mark_alerted(rej.id, "REJECTED")
    assert not s.mark_alerted(rej.id, "REJECTED")  # a second sender (restart, another agent) stands down
    assert [x.id for x in s.unalerted([State.REJECTED, State.PARTIALLY_REJECTED])] == [part.id]


def test_lookups_that_keep_the_daemon_off_the_history(journal):
    """feedback_keys of named files, route_has_history, pending_moves, last_upload: what the
    tracking cycle, the start-up and the problem checks read instead of listing every row."""
    from datetime import timedelta

    from filex_agent.store import utcnow

    s = journal()
    assert not s.route_has_history("r") and s.pending_moves() == [] and s.last_upload("r") is None
    s.record_feedback("r", "a.txt", 1, None, "/fb/a.txt", None)
    s.begin_feedback("r", "b.txt", 2, None)
    s.record_feedback("r", "c.txt", 3, None, "/fb/c.txt", None)
    assert s.route_has_history("r") and not s.route_has_history("other")
    assert s.feedback_keys("r", ["a.txt", "b.txt", "zzz"]) == ({("a.txt", 1, None)}, {("b.txt", 2, None)})
    assert s.feedback_keys("r", []) == (set(), set())
    assert s.feedback_keys("r", [f"n{i}" for i in range(1500)] + ["c.txt"]) == ({("c.txt", 3, None)}, set())
    one, two = _new(s, route="q"), _new(s, route="q", file_name="b.csv")
    assert s.route_has_history("q")
    s.update(two.id, move_to="/archive/sent", uploaded_at=utcnow())
    s.update(one.id, uploaded_at=utcnow() - timedelta(hours=1))
    assert [m.id for m in s.pending_moves()] == [two.id]
    assert s.last_upload("q") == s.get(two.id).uploaded_at and s.last_upload("r") is None
    s.update(two.id, move_to=None)
    assert s.pending_moves() == []


def test_claims_of_a_batch_are_created_in_one_write_skipping_files_another_agent_claims(journal):
    s = journal()
    other = _new(s, file_name="b.csv")  # another agent is claiming /o/b.csv (CLAIMING)
    made = s.create_claims(dict(route="r", org="0001", application="app1", transport="rest", owner="me"),
                           [("a.csv", "/o/a.csv"), ("b.csv", "/o/b.csv"), ("c.csv", "/o/c.csv")],
                           lambda sub_id, name: f"/spool/{sub_id}/{name}")
    assert made[1] is None
    a, c = made[0], made[2]
    assert a.state is State.CLAIMING and a.owner == "me" and a.local_path == f"/spool/{a.id}/a.csv"
    assert c.source_path == "/o/c.csv" and c.local_path == f"/spool/{c.id}/c.csv"
    assert [e.state for e in s.events(a.id)] == ["CLAIMING"]
    assert s.get(other.id).source_path == "/o/b.csv"
    assert s.events_many([a.id, c.id, other.id]) == {a.id: s.events(a.id), c.id: s.events(c.id),
                                                      other.id: s.events(other.id)}


def test_transition_many_applies_in_order_and_returns_conflicts_in_place(journal):
    from filex_agent.store import Transition

    s = journal()
    a, b = _new(s, file_name="a.csv"), _new(s, file_name="b.csv", state=State.QUEUED)
    out = s.transition_many([
        Transition(a.id, State.QUEUED, "claimed", frozenset({State.CLAIMING}), {"sha256": "ab", "size": 3}),
        Transition(b.id, State.QUEUED, "claimed", frozenset({State.CLAIMING})),  # b is QUEUED already
        Transition(a.id, State.HELD, "duplicate", frozenset({State.QUEUED}), {"reason": "same content"}),
    ])
    assert out[0].state is State.QUEUED and out[0].sha256 == "ab" and out[0].size == 3
    assert isinstance(out[1], StateConflict)
    assert out[2].state is State.HELD and out[2].reason == "same content"
    assert [e.state for e in s.events(a.id)] == ["CLAIMING", "QUEUED", "HELD"]
    assert [e.state for e in s.events(b.id)] == ["QUEUED"]


def test_settle_ends_the_attempt_and_moves_the_row_in_one_fenced_write(journal):
    from filex_agent.store import Transition

    s = journal()
    sub = _new(s, state=State.QUEUED)
    sub, att = _begin(s, sub.id)
    done = s.settle(att.id, Outcome.SENT, "uploaded", Transition(
        sub.id, State.SUBMITTED, "uploaded", frozenset({State.UPLOADING}), {"tracking_id": "t-9", "owner": None}),
        epoch=sub.epoch)
    assert done.state is State.SUBMITTED and done.tracking_id == "t-9"
    assert s.attempts(sub.id)[0].outcome is Outcome.SENT
    # A writer whose epoch was taken over changes neither the attempt nor the row.
    sub2 = _new(s, file_name="z.csv", state=State.QUEUED)
    sub2, att2 = _begin(s, sub2.id, lease=0.01)
    time.sleep(0.05)
    s.take_over(sub2.id, "rescuer")
    with pytest.raises(StaleEpoch):
        s.settle(att2.id, Outcome.SENT, "uploaded", Transition(sub2.id, State.SUBMITTED, "uploaded"),
                 epoch=sub2.epoch)
    assert s.get(sub2.id).state is State.UPLOADING and s.attempts(sub2.id)[0].outcome is Outcome.PENDING
