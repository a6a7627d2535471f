"""Group commit: writes of several threads share an fsync, and none returns before its own is on disk."""

from __future__ import annotations

import threading
import time

from filex_agent.audit import AuditLog
from filex_agent.fsutil import GroupSync
from filex_agent.store import State
from filex_agent.store.sqlite import SQLiteStore


def test_wait_returns_only_after_an_fsync_that_began_after_the_write():
    log: list[str] = []
    gate = threading.Event()

    def sync() -> None:
        log.append("sync-start")
        gate.wait(5)
        log.append("sync-end")

    g = GroupSync(sync)
    first = g.written()
    t = threading.Thread(target=g.wait, args=(first,))
    t.start()
    while "sync-start" not in log:
        time.sleep(0.001)
    # Written while that fsync runs: it must not count, a second fsync is needed.
    second = g.written()
    done = threading.Event()
    t2 = threading.Thread(target=lambda: (g.wait(second), done.set()))
    t2.start()
    time.sleep(0.05)
    assert not done.is_set()
    gate.set()
    t.join(5)
    t2.join(5)
    assert done.is_set()
    assert log == ["sync-start", "sync-end", "sync-start", "sync-end"]


def test_concurrent_writers_share_fsyncs():
    slow = threading.Event()

    def sync() -> None:
        slow.wait(0.01)

    g = GroupSync(sync)
    barrier = threading.Barrier(16)

    def writer() -> None:
        barrier.wait()
        for _ in range(10):
            g.wait(g.written())

    threads = [threading.Thread(target=writer) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert g.syncs < 160  # 160 durable writes, far fewer fsyncs
    assert g._synced == g._written == 160


def test_a_failed_fsync_raises_and_the_next_writer_syncs_again():
    calls = []

    def sync() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise OSError(5, "I/O error")

    g = GroupSync(sync)
    ticket = g.written()
    try:
        g.wait(ticket)
    except OSError:
        pass
    else:
        raise AssertionError("the fsync error must reach the writer")
    g.wait(ticket)  # not taken as durable: synced again
    assert len(calls) == 2


def test_every_journal_write_is_followed_by_an_fsync_of_the_wal(tmp_path, monkeypatch):
    store = SQLiteStore(tmp_path / "j.sqlite3")
    order: list[str] = []
    real = store._fsync_wal
    monkeypatch.setattr(store._group, "_sync", lambda: (order.append("fsync"), real()))
    sub = store.create(route="r", org="o", application="a", transport="rest", file_name="f", source_path="/x",
                       local_path="/x", state=State.CLAIMING)
    assert order == ["fsync"]
    store.transition(sub.id, State.QUEUED, "claimed")
    assert order == ["fsync", "fsync"]
    store.close()


def test_audit_batch_is_one_chained_write(tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl")
    audit.append("one", n=1)
    audit.append_many([("two", {"n": 2}), ("three", {"n": 3})])
    assert audit._group.syncs == 2
    res = audit.verify()
    assert res.ok and res.lines == 3
    assert [r["event"] for r in audit.read()] == ["one", "two", "three"]
    audit.close()
