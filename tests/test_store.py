"""The journal: state changes with events, compare-and-set, durability across reopen."""

import threading

import pytest

from filex_agent.store import FeedbackAlreadyFiled, State, StateConflict
from filex_agent.store.sqlite import SQLiteStore


def _new(store, **kw):
    base = dict(route="r", org="0001", application="app1", transport="rest", file_name="a.csv",
                source_path="/o/a.csv", local_path="/o/a.csv")
    base.update(kw)
    return store.create(**base)


def test_transitions_are_journaled_and_survive_reopen(tmp_path):
    s = SQLiteStore(tmp_path / "j.sqlite3")
    sub = _new(s)
    assert sub.state is State.CLAIMING and sub.org == "0001"
    s.transition(sub.id, State.QUEUED, "claimed", expect={State.CLAIMING})
    s.transition(sub.id, State.UPLOADING, "upload started")
    s.transition(sub.id, State.SUBMITTED, "uploaded", tracking_id="t-1")
    s.close()
    s = SQLiteStore(tmp_path / "j.sqlite3")
    sub = s.get(sub.id)
    assert sub.state is State.SUBMITTED and sub.tracking_id == "t-1"
    assert [e.state for e in s.events(sub.id)] == ["CLAIMING", "QUEUED", "UPLOADING", "SUBMITTED"]
    assert s.list([State.SUBMITTED])[0].id == sub.id
    assert s.list([State.QUEUED]) == []


def test_compare_and_set_refuses_a_stale_transition(tmp_path):
    s = SQLiteStore(tmp_path / "j.sqlite3")
    sub = _new(s, state=State.QUEUED)
    s.transition(sub.id, State.UPLOADING, expect={State.QUEUED})
    with pytest.raises(StateConflict):
        s.transition(sub.id, State.UPLOADING, expect={State.QUEUED})


def test_only_one_of_many_threads_wins_the_claim(tmp_path):
    s = SQLiteStore(tmp_path / "j.sqlite3")
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


def test_same_content_lookup(tmp_path):
    s = SQLiteStore(tmp_path / "j.sqlite3")
    a = _new(s, sha256="x", state=State.ACCEPTED)
    b = _new(s, sha256="x", state=State.QUEUED)
    assert s.find_same_content("0001", "app1", "x", exclude_id=b.id).id == a.id
    s.transition(a.id, State.REJECTED)
    assert s.find_same_content("0001", "app1", "x", exclude_id=b.id) is None
    assert s.find_same_content("0002", "app1", "x", exclude_id=0) is None


def test_tracking_ids_are_unique(tmp_path):
    import sqlite3

    s = SQLiteStore(tmp_path / "j.sqlite3")
    _new(s, tracking_id="t")
    with pytest.raises(sqlite3.IntegrityError):
        _new(s, tracking_id="t")


def test_feedback_recorded_once(tmp_path):
    import sqlite3

    s = SQLiteStore(tmp_path / "j.sqlite3")
    sub = _new(s)
    assert not s.feedback_seen("r", "f.txt", 10, "2025-01-01")
    s.record_feedback("r", "f.txt", 10, "2025-01-01", "/fb/f.txt", sub.id)
    assert s.feedback_seen("r", "f.txt", 10, "2025-01-01")
    assert not s.feedback_seen("r", "f.txt", 11, "2025-01-01")
    with pytest.raises(FeedbackAlreadyFiled) as caught:  # the store's conflict, not SQLite's
        s.record_feedback("r", "f.txt", 10, "2025-01-01", "/fb/f~1.txt", sub.id)
    assert caught.value.local_path == "/fb/f.txt" and not isinstance(caught.value, sqlite3.Error)
    assert [f.local_path for f in s.feedback_for(sub.id)] == ["/fb/f.txt"]


def test_unknown_field_is_an_error(tmp_path):
    s = SQLiteStore(tmp_path / "j.sqlite3")
    sub = _new(s)
    with pytest.raises(KeyError):
        s.update(sub.id, nonsense=1)


def test_count_per_route_without_listing(tmp_path):
    s = SQLiteStore(tmp_path / "j.sqlite3")
    for i in range(3):
        _new(s, route="a", file_name=f"a{i}.csv", state=State.QUEUED)
    _new(s, route="a", file_name="up.csv", state=State.UPLOADING)
    _new(s, route="b", file_name="b.csv", state=State.QUEUED)
    _new(s, route="c", file_name="c.csv", state=State.FAILED)
    assert s.count([State.QUEUED]) == {"a": 3, "b": 1}
    assert s.count([State.QUEUED, State.UPLOADING], route="a") == {"a": 4}
    assert s.count([State.QUEUED], route="c") == {}


def test_attempts_leases_and_fencing(tmp_path):
    from filex_agent.store import Outcome, StaleEpoch

    st = SQLiteStore(tmp_path / "j.db")
    s = _new(st, state=State.QUEUED)
    sub, att = st.begin_upload(s.id, "me", 5, transport="rest", remote_name="a.csv", upload_location="0001/app1/in")
    assert sub.state is State.UPLOADING and sub.epoch == 1 and att.n == 1 and att.outcome is Outcome.PENDING
    with pytest.raises(StateConflict):  # owned: nobody else may start it
        st.begin_upload(s.id, "me", 5, transport="rest", remote_name="a.csv", upload_location="0001/app1/in")
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
    st.end_attempt(att.id, Outcome.UNCONFIRMED, "lost")
    assert [x.id for x in st.unconfirmed()] == [att.id]
    st.transition(s.id, State.QUEUED, epoch=2, owner=None, lease_until=None)
    with pytest.raises(StateConflict):  # never sent again while an attempt is unconfirmed
        st.begin_upload(s.id, "me", 5, transport="rest", remote_name="a.csv", upload_location="0001/app1/in")
    st.end_attempt(att.id, Outcome.NOT_SENT, "no evidence")
    sub, att2 = st.begin_upload(s.id, "me", 5, transport="rest", remote_name="a.csv", upload_location="0001/app1/in")
    assert att2.n == 2 and sub.epoch == 3 and sub.attempts == 2


def test_expired_lease_is_found_and_taken_over(tmp_path):
    import time

    st = SQLiteStore(tmp_path / "j.db")
    s = _new(st, state=State.QUEUED)
    st.begin_upload(s.id, "dead", 0.05, transport="rest", remote_name="a.csv", upload_location="0001/app1/in")
    time.sleep(0.1)
    assert [x.id for x in st.expired_leases()] == [s.id]
    assert st.renew_leases("dead", 5) == set()  # an expired lease is not renewed: it is lost
    assert [x.id for x in st.expired_leases()] == [s.id]
    taken = st.take_over(s.id, "rescuer")
    assert taken.owner == "rescuer" and taken.epoch == 2


def test_old_journal_gains_the_new_columns(tmp_path):
    import sqlite3

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
