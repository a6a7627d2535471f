"""The daemon's recurring journal work reads what is pending, not the history (issue 15).

Every SQL statement a start, a tracking cycle, a dispatch tick, the status line and the first
page of `status` run is recorded and its query plan checked: none may scan a table that grows with
the history. SQLite without statistics (the agent never runs ANALYZE) plans the same whatever the
size, so a small journal shows the plan of a large one. bench/journal_scale.py times the same steps
at 10k, 100k and 1M rows.
"""

from __future__ import annotations

import re
import sqlite3

import pytest

from bench import journal_scale as js

# Tables whose size follows the history; the others hold one row per node, leader or setting.
HISTORY_TABLES = {"submissions", "events", "feedback", "attempts", "alerts"}
_SCAN = re.compile(r"\bSCAN (\w+)")


def _journal(tmp_path, rows: int):
    j, audit, _ = js.build(tmp_path / "work", rows)
    return js._config(tmp_path / f"data-{rows}", j, audit)


@pytest.fixture
def journal(tmp_path):
    return _journal(tmp_path, 300)


class _Seen(list):
    """Statements run (parameters inlined) and the SQLite virtual machine's work, in steps of 100
    instructions: the rows a statement reads, whichever index it reads them through."""

    vm = 0

    def tick(self) -> int:
        self.vm += 1
        return 0


def _record(monkeypatch) -> _Seen:
    """Every statement run on any journal connection opened from now on."""
    import filex_agent.store.sqlite as sqlite_store

    seen = _Seen()
    connect = sqlite3.connect

    def traced(*args, **kwargs):
        db = connect(*args, **kwargs)
        if str(args[0]).endswith(".index"):  # the audit file's own index, not the journal
            return db
        db.set_trace_callback(seen.append)
        db.set_progress_handler(seen.tick, 100)
        return db

    monkeypatch.setattr(sqlite_store.sqlite3, "connect", traced)
    return seen


def _reads_history(line: str, paged: bool, partial: set[str]) -> bool:
    scan = _SCAN.search(line)
    if not scan or scan.group(1) not in HISTORY_TABLES:
        return False
    index = re.search(r"USING (?:COVERING )?INDEX (\w+)", line)
    return not (index and (paged or index.group(1) in partial))


def _history_scans(path, statements: list[str]) -> dict[str, list[str]]:
    db = sqlite3.connect(path)
    found: dict[str, list[str]] = {}
    # A partial index holds only the rows of its WHERE (e.g. moves not done yet): walking it is fine.
    partial = {name for name, sql in db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'")
               if sql and " WHERE " in sql}
    try:
        for sql in dict.fromkeys(statements):
            if not re.match(r"\s*(SELECT|WITH|UPDATE|DELETE|INSERT\s.*\sSELECT\s)", sql, re.I | re.S):
                continue
            plan = [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}")]
            # A walk along an index in its own order that stops at LIMIT reads LIMIT rows (a page).
            paged = bool(re.search(r"\bLIMIT \d+\s*$", sql)) and not any("TEMP B-TREE" in line for line in plan)
            bad = [line for line in plan if _reads_history(line, paged, partial)]
            if bad:
                found[sql] = bad
    finally:
        db.close()
    return found


def test_start_and_every_recurring_step_read_no_history_table_whole(journal, monkeypatch):
    seen = _record(monkeypatch)
    store, daemon = js.start(journal)
    try:
        steps = js.recurring(journal, store, daemon)
        for step in steps.values():
            step()
        assert set(steps) >= {"tracking cycle (rescuer, reconciler, tracker, feedback)", "status line",
                              "dispatch tick (with its lease rescue)", "`status --json`, first page"}
    finally:
        daemon.executor.shutdown()
        store.close()
    # The steps did their work: the cycle asked for the pending uploads, the page for rows.
    assert any("state IN ('SUBMITTED')" in sql for sql in seen)
    assert any("LIMIT" in sql and "created_at" in sql for sql in seen)
    assert _history_scans(journal.journal_path, seen) == {}


def test_the_check_itself_catches_a_full_scan(journal, monkeypatch):
    seen = _record(monkeypatch)
    store, daemon = js.start(journal)
    try:
        store.list()  # what the start-up used to do to find journaled moves
    finally:
        daemon.executor.shutdown()
        store.close()
    scans = _history_scans(journal.journal_path, seen)
    assert any("ORDER BY id" in sql and "move_to" not in sql for sql in scans), scans


def _work(cfg, monkeypatch) -> dict[str, int]:  # noqa: ANN001
    """The journal work of the start and of each recurring step, in 100s of VM instructions."""
    seen = _record(monkeypatch)
    out = {}
    store, daemon = js.start(cfg)
    out["start"] = seen.vm
    try:
        for label, step in js.recurring(cfg, store, daemon).items():
            step()  # the first run writes what changed (tracking status); the second is the steady cycle
            before = seen.vm
            step()
            out[label] = seen.vm - before
    finally:
        daemon.executor.shutdown()
        store.close()
    return out


def test_the_work_of_each_step_does_not_grow_with_the_history(tmp_path, monkeypatch):
    small = _work(_journal(tmp_path, 300), monkeypatch)
    large = _work(_journal(tmp_path, 6000), monkeypatch)  # 20 times the history, the same pending set
    assert all(n > 0 for n in small.values()), small
    # Deeper indexes cost a little; reading the history would cost 20 times as much.
    grown = {label: (small[label], large[label]) for label in small if large[label] > 1.5 * small[label] + 20}
    assert grown == {}, grown


def test_an_overrunning_cycle_skips_its_ticks_and_says_so_once(journal, caplog):
    """A tracking cycle slower than its interval: the next ticks return at once (the scheduler never
    reaches its instance limit, whose warning came every tick), one warning is logged, not one a tick."""
    import logging
    import threading

    from filex_agent.daemon import Daemon

    daemon = Daemon(journal, dispatch_interval=3600)
    entered, release, runs = threading.Event(), threading.Event(), []

    def slow_cycle():
        runs.append(1)
        entered.set()
        release.wait(10)

    daemon._track_and_collect = slow_cycle
    caplog.set_level(logging.DEBUG, logger="filex_agent.daemon")
    first = threading.Thread(target=daemon.track_and_collect)
    first.start()
    try:
        assert entered.wait(10)
        for _ in range(20):  # twenty ticks while it runs
            daemon.track_and_collect()
            daemon._dispatch_job()  # the dispatch tick is not held up by it
    finally:
        release.set()
        first.join(10)
    assert runs == [1] and daemon._track_guard.skipped == 20 and daemon._dispatch_guard.skipped == 0
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "the tracking cycle is taking longer than its interval; its next runs are skipped until it ends"]
    # It ended: the next tick runs; a new overrun within the hour is logged at debug only.
    daemon._track_and_collect = lambda: runs.append(2)
    daemon.track_and_collect()
    assert runs == [1, 2]
    daemon.executor.shutdown()
    daemon.store.close()


def test_status_pages_filters_and_streams(journal, tmp_path, monkeypatch, capsys):
    """`filex-agent status` reads the newest rows by pages, not the whole journal (ordered, filtered, complete)."""
    import json

    from filex_agent import cli

    cfg_path = tmp_path / "filex-agent.toml"
    cfg_path.write_text("\n".join([
        "[agent]", f'data_dir = "{journal.agent.data_dir}"', "[journal]", f'url = "sqlite:///{journal.journal_path}"',
        "[audit]", f'path = "{journal.audit_path}"', "[credentials.c]", 'client_id = "x"', 'client_secret = "env:X"',
        *(line for r in journal.routes for line in ("[[routes]]", f'name = "{r.name}"', f'outbox = "{r.outbox}"',
                                                    'org = "0001"', 'application = "app1"', 'credential = "c"'))]))
    db = sqlite3.connect(journal.journal_path)
    everything = [r[0] for r in db.execute("SELECT id FROM submissions ORDER BY created_at DESC, id DESC")]
    queued = {r[0] for r in db.execute("SELECT id FROM submissions WHERE state = 'QUEUED'")}
    db.close()

    def status(*args: str) -> list[dict]:
        assert cli.main(["status", "-c", str(cfg_path), "--json", *args]) == 0
        return json.loads(capsys.readouterr().out)

    monkeypatch.setattr(cli, "STATUS_PAGE", 7)  # several pages even for a small journal
    assert [r["id"] for r in status("--limit", "20")] == everything[:20]
    assert [r["id"] for r in status("--limit", "0")] == everything  # all of it, page after page, in order
    assert {r["id"] for r in status("--state", "queued,HELD")} >= queued
    assert {r["state"] for r in status("--state", "queued,HELD")} == {"QUEUED", "HELD"}
    assert status("--since", "2999-01-01") == []
    assert cli.main(["status", "-c", str(cfg_path), "--state", "LOST"]) == 2
    assert "--state" in capsys.readouterr().err


def test_a_backlog_waits_in_the_journal_not_in_memory(journal, tmp_path):
    """Files claimed while every worker is busy are not each handed to the executor (a Future per file
    of a 100,000-file backlog): they stay QUEUED and the dispatch tick starts them as workers free."""
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from filex_agent.daemon import Daemon
    from filex_agent.store import State

    daemon = Daemon(journal, dispatch_interval=3600)
    store, workers = daemon.store, journal.agent.workers
    release, started = threading.Event(), []

    def upload(sub_id):
        started.append(sub_id)
        release.wait(10)
        store.transition(sub_id, State.SUBMITTED, "uploaded")
        with daemon._lock:
            daemon._inflight.pop(sub_id, None)

    daemon._upload = upload
    subs = [store.create(route=journal.routes[0].name, org="0001", application="app1", transport="rest",
                         file_name=f"b{i}.csv", source_path=f"/o/b{i}.csv", local_path=f"/o/b{i}.csv",
                         state=State.QUEUED) for i in range(10 * workers)]
    claimed = iter(subs)
    daemon.submitter.claim = lambda route, path, trigger=None: next(claimed)
    try:
        for sub in subs:
            daemon._on_candidate(SimpleNamespace(route=journal.routes[0], path=sub.source_path, trigger=None))
        assert len(daemon._inflight) == 2 * workers  # the rest wait in the journal, QUEUED
        assert daemon.executor._work_queue.qsize() <= workers
    finally:
        release.set()
    daemon.executor.shutdown(wait=True)
    assert len(started) == 2 * workers
    daemon.executor = ThreadPoolExecutor(workers)
    daemon.dispatch()  # the tick picks up the next ones from the journal
    daemon.executor.shutdown(wait=True)
    assert len(started) == 4 * workers and len(set(started)) == len(started)
    store.close()


def test_minute_checks_walk_the_backlog_by_pages(journal, monkeypatch):
    """The problem checks (and the audit sweep, through the same helper) read pending rows a page at
    a time: a 100,000-file backlog listed whole every minute set the daemon's peak memory."""
    from datetime import timedelta

    from filex_agent.observers import ProblemChecks
    from filex_agent.service import build_notifier
    from filex_agent.store import PENDING_STATES, SubmissionQuery, iter_submissions, utcnow
    from filex_agent.store.sqlite import SQLiteStore

    store = SQLiteStore(journal.journal_path)
    pages: list[int] = []
    search = store.search

    def paged(query, limit=50, **kw):
        pages.append(limit)
        return search(query, limit, **kw)

    def listing(*args, **kwargs):
        raise AssertionError("a listing of every pending row")

    monkeypatch.setattr(store, "search", paged)
    monkeypatch.setattr(store, "list", listing)
    # Every pending row of the journal, in pages of 7: none missed, none twice.
    pending = list(iter_submissions(store, SubmissionQuery(states=tuple(map(str, PENDING_STATES))), page=7))
    assert len(pending) == len({s.id for s in pending}) == sum(js.PENDING.values()) - js.PENDING["HELD"]
    assert pages and set(pages) == {7}
    pages.clear()
    checks = ProblemChecks(journal, store, build_notifier(journal.notify), clock=lambda: utcnow() + timedelta(days=30))
    stuck = {k for k in checks.run() if k.startswith("STUCK:")}
    assert len(stuck) == len(pending) and pages and max(pages) <= 500
    store.close()

