"""High availability around the journal: copying an SQLite journal into PostgreSQL, the node
registry command, refusing a newer schema."""

from __future__ import annotations

import json
import sqlite3

import pytest

from filex_agent.cli import main
from filex_agent.store import Outcome, State
from filex_agent.store.sqlite import SQLiteStore


def _config(tmp_path, journal: str = "") -> str:
    path = tmp_path / "agent.toml"
    path.write_text(f'[agent]\ndata_dir = "{tmp_path / "data"}"\n{journal}')
    return str(path)


def _fill(st) -> None:
    """A journal with something in every table."""
    for i, state in enumerate([State.QUEUED, State.QUEUED, State.HELD, State.ACCEPTED]):
        st.create(route="r", org="0001", application="app1", transport="rest", file_name=f"f{i}.csv",
                  source_path=f"/o/f{i}.csv", local_path=f"/o/f{i}.csv", state=state, size=i, sha256=f"h{i}")
    sub, att = st.begin_upload(1, "old:1:x", 30, transport="rest", remote_name="f0.csv", upload_location="0001/app1/in")
    st.set_ticket(att.id, sub.epoch, "T-1")
    st.commit_attempt(att.id, sub.epoch)
    st.end_attempt(att.id, Outcome.UNCONFIRMED, "answer lost")
    st.transition(4, State.ACCEPTED, "accepted", tracking_id="T-4", remote_status="ACCEPTED")
    st.begin_feedback("r", "fb1.txt", 10, "2026-01-01")
    st.record_feedback("r", "fb1.txt", 10, "2026-01-01", "/fb/fb1.txt", 4)
    st.begin_feedback("r", "fb2.txt", None, None)  # in doubt
    st.heartbeat_node("old", {"pid": 7})
    st.try_lead("tracking", "old:1:x", 30)
    from datetime import datetime, timezone

    from filex_agent.store import Occurrence

    due = datetime(2026, 12, 1, 21, 0, tzinfo=timezone.utc)
    st.save_occurrence(Occurrence("daily", due, due, due, "r", "*.csv", "2026-12-01", "ACCEPTED", True, 4,
                                  "ACCEPTED", closed=True, updated_at=due))
    st.record_calendar_alert("daily", due, "LATE", due)


def _snapshot(st) -> dict:
    subs = st.list()
    return {"subs": subs, "events": {s.id: [(e.state, e.detail) for e in st.events(s.id)] for s in subs},
            "attempts": {s.id: st.attempts(s.id) for s in subs}, "fb": st.feedback_keys("r"),
            "fb_for": st.feedback_for(4), "nodes": [(n.node, n.info) for n in st.nodes()],
            "leaders": {k: (v.owner, v.epoch) for k, v in st.leaders().items()},
            "calendar": [(o, st.calendar_alerts(o.expectation, o.deadline)) for o in st.occurrences()]}


def test_journal_migrate_copies_every_row_once(tmp_path, pg_server, pg_url, monkeypatch, capsys):
    from filex_agent.store.postgres import PostgresStore

    cfg = _config(tmp_path)
    src = SQLiteStore(tmp_path / "data" / "journal.sqlite3")
    _fill(src)
    before = _snapshot(src)
    src.close()
    monkeypatch.setenv("PGPW", pg_server.password)
    assert main(["journal", "migrate", "-c", cfg, "--to", pg_url, "--password", "env:PGPW"]) == 0
    assert "submissions 4" in capsys.readouterr().out
    pg = PostgresStore(pg_url, password=pg_server.password)
    try:
        assert _snapshot(pg) == before  # ids, times, states, attempts, feedback, nodes, leaders
        new = pg.create(route="r", org="0001", application="app1", transport="rest", file_name="n.csv",
                        source_path="/o/n.csv", local_path="/o/n.csv")
        assert new.id == 5  # the sequence moved past the copied ids
        # Once: a second run into the same database is refused and changes nothing.
        assert main(["journal", "migrate", "-c", cfg, "--to", pg_url, "--password", "env:PGPW"]) == 1
        assert "already has rows" in capsys.readouterr().err
        assert len(pg.list()) == 5
    finally:
        pg.close()
    # The SQLite journal is left as it was.
    src = SQLiteStore(tmp_path / "data" / "journal.sqlite3")
    assert _snapshot(src) == before
    src.close()


def test_journal_migrate_refuses_a_password_in_the_url(tmp_path, capsys):
    cfg = _config(tmp_path)
    assert main(["journal", "migrate", "-c", cfg, "--to", "postgresql://u:hunter2@127.0.0.1:1/db"]) == 2
    err = capsys.readouterr().err
    assert "journal.url" in err and "hunter2" not in err


def test_journal_migrate_refuses_a_table_it_does_not_know(tmp_path, pg_server, pg_url, monkeypatch, capsys):
    cfg = _config(tmp_path)
    SQLiteStore(tmp_path / "data" / "journal.sqlite3").close()
    db = sqlite3.connect(tmp_path / "data" / "journal.sqlite3")
    db.execute("CREATE TABLE calendar (id INTEGER PRIMARY KEY)")
    db.commit()
    db.close()
    monkeypatch.setenv("PGPW", pg_server.password)
    assert main(["journal", "migrate", "-c", cfg, "--to", pg_url, "--password", "env:PGPW"]) == 1
    assert "calendar" in capsys.readouterr().err


def test_an_agent_older_than_its_journal_refuses_to_start(tmp_path, capsys):
    cfg = _config(tmp_path)
    path = tmp_path / "data" / "journal.sqlite3"
    SQLiteStore(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    assert main(["status", "-c", cfg]) == 1
    err = capsys.readouterr().err
    assert "schema version 99" in err and "upgrade this node" in err


def _pg_journal(pg_server, url: str, **kw) -> dict:
    import os

    os.environ["FILEX_TEST_PG_PASSWORD"] = pg_server.password
    return {"url": url, "password": "env:FILEX_TEST_PG_PASSWORD", **kw}


def _node_config(sandbox, base, journal: dict, node: str):
    """One agent of a cluster: shared data_dir and outboxes, its own node_name."""
    from filex_agent.config import load_config
    from filex_agent.sandbox.agent_config import write_sandbox_config

    path = write_sandbox_config(sandbox, base, poll_seconds=0.5, stable_seconds=0.3, transports=("rest",),
                                journal={**journal, "node_name": node})
    mine = path.with_name(f"{node}.toml")
    path.rename(mine)
    return load_config(mine), mine


def test_nodes_share_the_work_and_one_leads_with_failover(sandbox, tmp_path, pg_server, pg_url, capsys):
    """Two agents on one PostgreSQL journal and one outbox: every file filed once, one leader of
    each singleton; the leader stops and the other takes over within the lease."""
    from pathlib import Path

    from filex_agent.daemon import Daemon
    from tests.conftest import wait_for

    journal = _pg_journal(pg_server, pg_url, lease_seconds=2)
    cfg_a, path_a = _node_config(sandbox, tmp_path, journal, "node-a")
    cfg_b, _ = _node_config(sandbox, tmp_path, journal, "node-b")
    a, b = Daemon(cfg_a, dispatch_interval=0.2), Daemon(cfg_b, dispatch_interval=0.2)
    a.start()
    b.start()
    try:
        outbox = Path(cfg_a.routes[0].outbox)
        names = [f"HA_{i:02d}.csv" for i in range(12)]
        for n in names:
            (outbox / n).write_bytes(f"{n}\n".encode())
        wait_for(lambda: sorted(s.file_name for s in a.store.list([State.ACCEPTED])) == names, timeout=60,
                 what="every file accepted")
        assert sorted(s.file_name for s in a.store.list()) == names  # no FAILED row from a claim race
        for n in names:
            assert len([u for u in sandbox.uploads() if u.name == n]) == 1
        assert [a.leads("tracking"), b.leads("tracking")].count(True) == 1
        leader, other = (a, b) if a.leads("tracking") else (b, a)
        assert main(["nodes", "-c", str(path_a), "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert {n["node"] for n in shown["nodes"]} == {"node-a", "node-b"} and all(n["alive"] for n in shown["nodes"])
        assert {x["singleton"]: x["owner"] for x in shown["leaders"]}["tracking"] == leader.owner
        leader.stop(grace=5)  # a clean stop resigns: the other leads at its next heartbeat
        wait_for(lambda: other.leads("tracking") and other.leads("feedback"), timeout=10, what="failover")
        (outbox / "HA_after.csv").write_bytes(b"after\n")
        wait_for(lambda: any(s.file_name == "HA_after.csv" and s.state is State.ACCEPTED
                             for s in other.store.list()), timeout=30, what="filed after failover")
    finally:
        a.stop(grace=5)
        b.stop(grace=5)


def test_a_silent_leader_loses_the_lead_after_its_lease(tmp_path, pg_server, pg_url):
    """The leader stops renewing (dead, paused): another node leads once the lease ran out, and the
    silent one, resumed, no longer believes it leads."""
    import time

    from filex_agent.leases import Leadership
    from filex_agent.store.postgres import PostgresStore

    st_a = PostgresStore(pg_url, password=pg_server.password)
    st_b = PostgresStore(pg_url, password=pg_server.password)
    try:
        a = Leadership(st_a, "a:1:x:run", "a", 1.0, info=dict, names=("tracking",))
        b = Leadership(st_b, "b:2:y:run", "b", 1.0, info=dict, names=("tracking",))
        a.beat()
        b.beat()
        assert a.leads("tracking") and not b.leads("tracking")
        started = time.monotonic()
        while not b.leads("tracking"):  # a is silent from now on
            time.sleep(0.1)
            b.beat()
        assert 0.5 < time.monotonic() - started < 3
        assert not a.leads("tracking")  # its own clock says the lease is gone
        a.beat()
        assert not a.leads("tracking")
    finally:
        st_a.close()
        st_b.close()


def test_doctor_checks_the_journal(tmp_path, pg_server, pg_url):
    import io

    from filex_agent.config import parse_config
    from filex_agent.doctor import Doctor

    def doctor(journal):
        out = io.StringIO()
        d = Doctor(out)
        d.check_journal(parse_config({"agent": {"data_dir": str(tmp_path / "d")}, "journal": journal}))
        return d, out.getvalue()

    d, out = doctor(_pg_journal(pg_server, pg_url))
    assert not d.failed, out
    assert "reachable, schema version 3" in out and "journal clock" in out
    assert "behind" in out or "ahead" in out
    d, out = doctor({"url": pg_url.replace(str(pg_server.port), "1"), "password": "env:FILEX_TEST_PG_PASSWORD"})
    assert d.failed and "FAIL  journal:" in out and "pg_hba.conf" in out and pg_server.password not in out
    d, out = doctor({})
    assert not d.failed and "will be created" in out


def test_a_collector_that_lost_its_lead_leaves_the_new_leaders_copy(sandbox, sandbox_config, monkeypatch):
    """Collector A is paused after downloading a feedback file, before recording it; B (the new
    leader) files it meanwhile. A's record is refused and its own copy removed: one local copy."""
    import os
    from pathlib import Path

    from filex_agent.daemon import Daemon
    from filex_agent.feedback import FeedbackCollector

    cfg = sandbox_config(transports=("s3",))
    d = Daemon(cfg)
    route = cfg.routes[0]
    sub = d.store.create(route=route.name, org=route.org, application=route.application, transport="s3",
                         file_name="FBRACE.csv", source_path="/o/FBRACE.csv", local_path="/o/FBRACE.csv",
                         state=State.SUBMITTED, tracking_id=f"fbrace-{os.getpid()}")
    name = f"FBRACE_{sub.tracking_id}_feedback.txt"
    sandbox.admin_s3.put_object(Bucket=sandbox.bucket, Key=f"{route.org}/{route.application}/out/{name}",
                                Body=b"feedback\n")
    a = FeedbackCollector(cfg, d.store, d.connections, d.hooks)
    b = FeedbackCollector(cfg, d.store, d.connections, d.hooks)
    real = d.store.record_feedback
    raced = []

    def paused_then_record(*args, **kw):
        if not raced:  # A's first record: B runs a whole cycle "while A is paused"
            raced.append(1)
            monkeypatch.setattr(d.store, "record_feedback", real)
            assert b.collect(route) == 1
        return real(*args, **kw)

    monkeypatch.setattr(d.store, "record_feedback", paused_then_record)
    assert a.collect(route) == 0
    folder = route.folder("feedback", cfg.agent.data_dir)
    assert [p.name for p in folder.iterdir() if p.name.startswith("FBRACE")] == [name]
    (filed,) = d.store.feedback_for(sub.id)
    assert Path(filed.local_path).name == name
    d.stop(grace=0)
