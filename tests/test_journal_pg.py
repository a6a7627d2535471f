"""PostgreSQL journal specifics: a lost database pauses work and loses nothing; migrations run once
under a lock; the password never shows. Uses its own server (these tests stop and restart it)."""

from __future__ import annotations

import threading

import pytest

from filex_agent.store import JournalUnavailable, State
from tests.pg_fixture import PgServer, skip_reason

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")


@pytest.fixture(scope="module")
def server():
    srv = PgServer()
    srv.start()
    yield srv
    srv.close()


def _open(server, db, **kw):
    from filex_agent.store.postgres import PostgresStore

    return PostgresStore(server.url(db), password=server.password, **kw)


def _new(store, name="a.csv"):
    return store.create(route="r", org="0001", application="app1", transport="rest", file_name=name,
                        source_path=f"/o/{name}", local_path=f"/o/{name}", state=State.QUEUED)


def test_a_restarted_database_pauses_work_and_loses_nothing(server):
    server.database("restart")
    st = _open(server, "restart", retry_seconds=30)
    try:
        a = _new(st)
        server.kill()  # crash: every pooled connection is cut
        restarted = threading.Timer(1.0, server.start)
        restarted.start()
        # Issued while the server is down: retried with backoff until it is back.
        b = _new(st, "b.csv")
        restarted.join()
        assert [s.id for s in st.list()] == [a.id, b.id]
        assert [e.state for e in st.events(b.id)] == ["QUEUED"]
    finally:
        st.close()


def test_a_database_down_too_long_raises_journal_unavailable_without_the_password(server):
    server.database("down")
    st = _open(server, "down", retry_seconds=1.5, connect_timeout=2)
    try:
        sub = _new(st)
        server.stop()
        try:
            with pytest.raises(JournalUnavailable) as info:
                st.transition(sub.id, State.UPLOADING, expect={State.QUEUED})
            assert server.password not in str(info.value) and "unavailable" in str(info.value)
        finally:
            server.start()
        assert st.get(sub.id).state is State.QUEUED  # the failed write did not half-happen
        st.transition(sub.id, State.UPLOADING, expect={State.QUEUED})
    finally:
        st.close()


def test_unreachable_or_refused_at_start_is_journal_unavailable(server):
    from filex_agent.store.postgres import PostgresStore

    with pytest.raises(JournalUnavailable) as info:
        PostgresStore(server.url("postgres"), password="wrong-" + server.password[:4], connect_timeout=2)
    assert "wrong-" not in str(info.value)


def test_nodes_starting_together_migrate_once(server):
    server.database("together")
    stores, errors = [], []

    def go():
        try:
            stores.append(_open(server, "together"))
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(4)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    try:
        assert not errors and len(stores) == 4
        with server.connect("together") as db:
            assert db.execute("SELECT version FROM schema_version").fetchall() == [(3,)]
    finally:
        for st in stores:
            st.close()


def test_the_lease_is_reckoned_by_the_server_clock(server):
    server.database("clock")
    st = _open(server, "clock")
    try:
        sub = _new(st)
        with server.connect("clock") as db:
            server_now = db.execute("SELECT now()").fetchone()[0]
        sub, _ = st.begin_upload(sub.id, "n:1:x", 30, transport="rest", remote_name="a.csv",
                                 upload_location="0001/app1/in")
        assert abs((sub.lease_until - server_now).total_seconds() - 30) < 5
        assert abs((st.now() - server_now).total_seconds()) < 5
    finally:
        st.close()


def test_a_journal_from_before_the_status_page_gets_its_indexes_at_open(server):
    from filex_agent.store import PageKey, SubmissionQuery
    from filex_agent.store.postgres import _VIEW_INDEXES

    server.database("views")
    st = _open(server, "views")
    subs = [_new(st, f"N{i}.csv") for i in range(3)]
    st.close()
    with server.connect("views") as db:  # as a journal migrated by the version before them left it
        for name in _VIEW_INDEXES:
            db.execute(f"DROP INDEX {name}")
    st = _open(server, "views")
    try:
        page = st.search(SubmissionQuery(text="N"), 2, after=PageKey(subs[2].created_at, subs[2].id))
        assert [s.id for s in page.rows] == [subs[1].id, subs[0].id]
        with server.connect("views") as db:
            names = {r[0] for r in db.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'submissions'")}
            assert set(_VIEW_INDEXES) <= names
            assert db.execute("SELECT version FROM schema_version").fetchall() == [(3,)]  # no new version
            # The queries' shapes can use them (the name index only in the collation they compare in).
            db.execute("SET enable_seqscan = off")
            plan = "\n".join(r[0] for r in db.execute(
                "EXPLAIN SELECT * FROM submissions WHERE file_name COLLATE \"C\" >= 'N' "
                "AND file_name COLLATE \"C\" < 'N\U0010ffff'"))
            assert "submissions_name" in plan, plan
            plan = "\n".join(r[0] for r in db.execute(
                "EXPLAIN SELECT * FROM submissions WHERE (created_at, id) < (now(), 5) "
                "ORDER BY created_at DESC, id DESC LIMIT 3"))
            assert "submissions_created" in plan, plan
    finally:
        st.close()
