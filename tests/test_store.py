"""The journal: state changes with events, compare-and-set, durability across reopen."""

import threading

import pytest

from filex_agent.store import State, StateConflict
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
    with pytest.raises(sqlite3.IntegrityError):
        s.record_feedback("r", "f.txt", 10, "2025-01-01", "/fb/f~1.txt", sub.id)
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
