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


def _snapshot(st) -> dict:
    subs = st.list()
    return {"subs": subs, "events": {s.id: [(e.state, e.detail) for e in st.events(s.id)] for s in subs},
            "attempts": {s.id: st.attempts(s.id) for s in subs}, "fb": st.feedback_keys("r"),
            "fb_for": st.feedback_for(4), "nodes": [(n.node, n.info) for n in st.nodes()],
            "leaders": {k: (v.owner, v.epoch) for k, v in st.leaders().items()}}


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
