"""Tracker: batching of /tracking calls, matching of id-less uploads, overdue flags."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from filex_agent.config import parse_config
from filex_agent.hooks import Hooks
from filex_agent.models import TrackingRecord
from filex_agent.store import State, utcnow
from filex_agent.store.sqlite import SQLiteStore
from filex_agent.submitter import Submitter
from filex_agent.tracker import Tracker, matches


class FakeApi:
    def __init__(self):
        self.records: list[TrackingRecord] = []
        self.calls: list[str | None] = []

    def tracking(self, tracking_id=None):
        self.calls.append(tracking_id)
        return [r for r in self.records if tracking_id is None or r.trackingId == tracking_id]


class FakeConnections:
    def __init__(self, api):
        self._api = api

    def has_api(self, cred):
        return True

    def api(self, cred):
        return self._api


def rec(tid, name="a.csv", loc="0001/app1/in", size=10, downstream=None, status="Received by FINRA", when=None):
    return TrackingRecord.model_validate({
        "trackingId": tid, "fileName": name, "uploadLocation": loc, "fileSize": size, "status": status,
        "downstreamStatus": downstream, "submissionTime": (when or utcnow()).isoformat()})


@pytest.fixture
def env(tmp_path):
    cfg = parse_config({"agent": {"data_dir": str(tmp_path / "data")},
                        "tracking": {"batch_threshold": 3, "match_timeout_seconds": 60},
                        "credentials": {"c": {"client_id": "x", "client_secret": "env:X"}},
                        "routes": [{"name": "r", "outbox": str(tmp_path / "out"), "org": "0001",
                                    "application": "app1", "credential": "c", "transport": "s3"}]})
    store = SQLiteStore(tmp_path / "j.sqlite3")
    api = FakeApi()
    conns = FakeConnections(api)
    tracker = Tracker(cfg, store, conns, Submitter(cfg, store, conns, Hooks()), Hooks())
    return cfg, store, api, tracker, tmp_path


def submitted(store, tmp_path, name="a.csv", tracking_id=None, size=10, started=None):
    f = tmp_path / f"spool-{name}-{tracking_id}"
    f.write_bytes(b"x" * size)
    return store.create(route="r", org="0001", application="app1", transport="s3", file_name=name,
                        source_path=str(f), local_path=str(f), state=State.SUBMITTED, size=size,
                        tracking_id=tracking_id, upload_location="0001/app1/in",
                        upload_started_at=started or utcnow() - timedelta(seconds=1), uploaded_at=utcnow())


def test_few_pending_with_ids_use_per_id_calls(env):
    cfg, store, api, tracker, tmp = env
    a = submitted(store, tmp, "a.csv", "t1")
    submitted(store, tmp, "b.csv", "t2")
    api.records = [rec("t1", downstream="ACCEPTED"), rec("t2", "b.csv")]
    assert tracker.poll() == 1
    assert sorted(api.calls) == ["t1", "t2"]
    a = store.get(a.id)
    assert a.state is State.ACCEPTED and Path(a.local_path).parent.name == "accepted"


def test_many_pending_use_one_call_per_credential(env):
    cfg, store, api, tracker, tmp = env
    for i in range(5):
        submitted(store, tmp, f"f{i}.csv", f"t{i}")
    api.records = [rec(f"t{i}", f"f{i}.csv", downstream="REJECTED") for i in range(5)]
    assert tracker.poll() == 5
    assert api.calls == [None]
    assert {s.state for s in store.list()} == {State.REJECTED}


def test_idless_upload_matched_by_name_location_size_and_time(env):
    cfg, store, api, tracker, tmp = env
    started = utcnow()
    sub = submitted(store, tmp, "a.csv", None, size=10, started=started)
    api.records = [
        rec("old", when=started - timedelta(hours=2), downstream="ACCEPTED"),  # an earlier same-name file
        rec("other-size", size=11),
        rec("other-place", loc="0002/app1/in"),
        rec("mine", downstream="PARTIALLY_REJECTED", when=started + timedelta(seconds=1)),
    ]
    tracker.poll()
    sub = store.get(sub.id)
    assert sub.tracking_id == "mine" and sub.state is State.PARTIALLY_REJECTED


def test_two_idless_uploads_of_one_name_get_distinct_records(env):
    cfg, store, api, tracker, tmp = env
    t0 = utcnow()
    a = submitted(store, tmp, "same.csv", None, started=t0)
    b = submitted(store, tmp, "same.csv", None, started=t0 + timedelta(seconds=2))
    api.records = [rec("r1", "same.csv", when=t0 + timedelta(seconds=1)),
                   rec("r2", "same.csv", when=t0 + timedelta(seconds=3))]
    tracker.poll()
    assert {store.get(a.id).tracking_id, store.get(b.id).tracking_id} == {"r1", "r2"}


def test_unmatched_upload_is_flagged_after_the_timeout(env):
    cfg, store, api, tracker, tmp = env
    sub = submitted(store, tmp, "lonely.csv", None)
    tracker.poll()
    assert store.get(sub.id).flag is None
    store.update(sub.id, uploaded_at=utcnow() - timedelta(seconds=120))
    tracker.poll()
    sub = store.get(sub.id)
    assert sub.state is State.SUBMITTED and "no tracking record matched lonely.csv" in sub.flag


def test_matches_rules():
    from filex_agent.store import Submission

    now = utcnow()
    s = Submission(id=1, route="r", org="0001", application="app1", transport="sftp", file_name="a.csv",
                   source_path="", local_path="", state=State.SUBMITTED, size=10, upload_location="0001/app1/in",
                   upload_started_at=now)
    assert matches(rec("x", loc="/0001/app1/in/"), s)  # slashes tolerated
    assert not matches(rec("x", size=0), s)  # a record of other bytes is never this upload's
    assert not matches(rec("x", status="Request Received"), s)  # a URL handed out, no byte arrived
    assert matches(rec("x", size=None), s)  # no size given: name, place and time decide
    assert not matches(rec("x", name="A.csv"), s)  # names are case sensitive
    assert not matches(rec("x", when=now - timedelta(hours=1)), s)


def test_a_corrupt_copy_note_stays_with_the_verdict(env):
    """FINRA's verdict on a corrupt copy is shown, and the note that a corrected file must be sent
    is kept beside it (ACCEPTED included: FINRA accepted bytes that were not the file)."""
    cfg, store, api, tracker, tmp = env
    note = "a corrupt copy reached fileX and could not be removed (ETag mismatch); send a corrected file"
    a = submitted(store, tmp, "a.csv", "t1")
    b = submitted(store, tmp, "b.csv", "t2")
    store.update(a.id, reason=note)
    store.update(b.id, reason=note)
    api.records = [rec("t1", "a.csv", downstream="ACCEPTED"), rec("t2", "b.csv", downstream="REJECTED")]
    tracker.poll()
    a, b = store.get(a.id), store.get(b.id)
    assert a.state is State.ACCEPTED and a.reason == note
    assert b.state is State.REJECTED and b.reason.startswith(note) and "FINRA rejected the file" in b.reason


def test_the_cycle_gives_way_before_each_submission(env):
    """The daemon's pacer is called once per submission's turn, matched or not."""
    cfg, store, api, tracker, tmp = env
    for i in range(4):
        submitted(store, tmp, f"f{i}.csv", f"t{i}" if i % 2 else None)
    api.records = [rec("t1", "f1.csv"), rec("t3", "f3.csv"), rec("x", "f0.csv", size=10)]
    turns = []
    tracker.pace = lambda: turns.append(1)
    tracker.poll()
    assert len(turns) == 4
    assert store.list([State.SUBMITTED])[0].tracking_id == "x"  # f0.csv matched through the name index


def test_an_idless_upload_is_matched_among_many_records_of_other_names(env):
    cfg, store, api, tracker, tmp = env
    subs = [submitted(store, tmp, f"n{i}.csv") for i in range(3)]
    api.records = [rec(f"other{i}", f"x{i}.csv") for i in range(50)] + [rec("late", "n1.csv"), rec("early", "n1.csv")]
    tracker.poll()
    got = {s.id: s.tracking_id for s in store.list([State.SUBMITTED])}
    assert got[subs[1].id] in ("late", "early") and got[subs[0].id] is None and got[subs[2].id] is None


def test_pacer_pauses_as_long_as_the_work_only_while_files_move():
    from filex_agent.daemon import Pacer

    now = [0.0]
    slept: list[float] = []
    busy = [True]
    pacer = Pacer(lambda: busy[0], sleep=slept.append, clock=lambda: now[0])
    now[0] = 0.02  # 20 ms of work (a fsynced write) since the last call
    pacer()
    now[0] = 5.0  # a long stretch: the pause is capped
    pacer()
    busy[0] = False
    now[0] = 5.03
    pacer()
    assert slept == [0.02, Pacer.MAX_PAUSE, 0]
