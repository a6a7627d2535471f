"""Outbox watcher against real folders and real watchdog observers (inotify and polling)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from watchdog.observers.polling import PollingObserverVFS

import filex_agent.watcher as watcher_mod
from filex_agent.config import RouteSettings
from filex_agent.watcher import Candidate, OutboxWatcher

STABLE = 0.3


def make_route(tmp_path: Path, name: str = "r1", **kw: Any) -> RouteSettings:
    kw.setdefault("stable_seconds", STABLE)
    return RouteSettings(name=name, outbox=tmp_path / name / "outbox", org="1234", application="APP",
                         credential="c", **kw)


class Collector:
    """on_ready callback recording candidates with the (real) time they arrived."""

    def __init__(self) -> None:
        self.items: list[tuple[float, Candidate]] = []
        self.cond = threading.Condition()

    def __call__(self, c: Candidate) -> None:
        with self.cond:
            self.items.append((time.monotonic(), c))
            self.cond.notify_all()

    @property
    def names(self) -> list[str]:
        with self.cond:
            return [c.path.name for _, c in self.items]

    def of(self, name: str) -> list[Candidate]:
        with self.cond:
            return [c for _, c in self.items if c.path.name == name]

    def wait_for(self, pred: Callable[[], bool], timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
            return True

    def wait_name(self, name: str, count: int = 1, timeout: float = 5.0) -> list[Candidate]:
        assert self.wait_for(lambda: sum(1 for _, c in self.items if c.path.name == name) >= count, timeout), \
            f"{name} not emitted {count}x within {timeout}s; got {self.names}"
        return self.of(name)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.lock = threading.Lock()

    def __call__(self) -> float:
        with self.lock:
            return self.now

    def advance(self, s: float) -> None:
        with self.lock:
            self.now += s


def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


@pytest.fixture
def collector() -> Collector:
    return Collector()


@pytest.fixture
def watchers() -> Iterator[list[OutboxWatcher]]:
    made: list[OutboxWatcher] = []
    yield made
    for w in made:
        w.stop()


def start(watchers: list[OutboxWatcher], routes: list[RouteSettings], cb: Callable[[Candidate], None],
          **kw: Any) -> OutboxWatcher:
    w = OutboxWatcher(routes, cb, **kw)
    watchers.append(w)
    w.start()
    return w


def write(path: Path, data: bytes = b"x,y\n1,2\n") -> float:
    with open(path, "wb") as f:
        f.write(data)
    return time.monotonic()


def test_ready_after_stability_once(tmp_path: Path, collector: Collector, watchers: list[OutboxWatcher]) -> None:
    r = make_route(tmp_path)
    w = start(watchers, [r], collector)
    assert r.outbox.is_dir() and w.healthy()
    closed_at = write(r.outbox / "a.csv", b"hello")
    (c,) = collector.wait_name("a.csv")
    got_at = collector.items[0][0]
    assert got_at - closed_at >= STABLE - 0.02
    st = os.lstat(r.outbox / "a.csv")
    assert c == Candidate(route=r, path=r.outbox / "a.csv", trigger=None, size=5, mtime_ns=st.st_mtime_ns,
                          is_symlink=False)
    assert c.path.is_absolute()
    time.sleep(3 * STABLE)  # dedup: still there, unchanged, well inside the re-emission period
    assert collector.names == ["a.csv"]


def test_slow_chunked_writer_emitted_once_whole(tmp_path: Path, collector: Collector,
                                                watchers: list[OutboxWatcher]) -> None:
    r = make_route(tmp_path)
    start(watchers, [r], collector)
    path = r.outbox / "big.csv"
    chunk = b"z" * 1000
    with open(path, "wb") as f:
        for _ in range(8):
            f.write(chunk)
            f.flush()
            time.sleep(STABLE / 2)
        last_write = time.monotonic()
    (c,) = collector.wait_name("big.csv")
    assert c.size == 8000
    assert collector.items[0][0] >= last_write
    time.sleep(3 * STABLE)
    assert len(collector.of("big.csv")) == 1


def test_writer_pausing_longer_than_window_is_not_taken_while_open(
        tmp_path: Path, collector: Collector, watchers: list[OutboxWatcher]) -> None:
    # inotify saw the writes and no close: the file is held until the writer closes it.
    r = make_route(tmp_path)
    start(watchers, [r], collector)
    path = r.outbox / "slow.csv"
    with open(path, "wb") as f:
        f.write(b"a" * 100)
        f.flush()
        time.sleep(STABLE * 3)
        f.write(b"b" * 100)
        f.flush()
        time.sleep(STABLE * 3)
        assert collector.names == []
        f.write(b"c" * 100)
    (c,) = collector.wait_name("slow.csv")
    assert c.size == 300


def test_unclosed_write_taken_after_grace(tmp_path: Path, collector: Collector,
                                          watchers: list[OutboxWatcher]) -> None:
    # A lost close event (queue overflow) only delays the file, it is never left behind.
    clock = FakeClock()
    r = make_route(tmp_path)
    w = start(watchers, [r], collector, clock=clock, rescan_interval=10.0)
    f = open(r.outbox / "open.csv", "wb")
    try:
        f.write(b"data")
        f.flush()
        assert wait_until(lambda: r.outbox / "open.csv" in w._entries)
        time.sleep(0.3)
        clock.advance(5.0)
        time.sleep(0.6)
        assert collector.names == []
        clock.advance(w.reemit_seconds)
        (c,) = collector.wait_name("open.csv")
        assert c.size == 4
    finally:
        f.close()


def test_default_ignores_and_dotfiles(tmp_path: Path, collector: Collector, watchers: list[OutboxWatcher]) -> None:
    r = make_route(tmp_path)
    start(watchers, [r], collector)
    for name in ("a.tmp", "b.part", ".hidden", "c.csv~", "d.swp", "~$e.xlsx"):
        write(r.outbox / name)
    write(r.outbox / "sentinel.csv")
    collector.wait_name("sentinel.csv")
    time.sleep(2 * STABLE)
    assert collector.names == ["sentinel.csv"]


def test_include_patterns(tmp_path: Path, collector: Collector, watchers: list[OutboxWatcher]) -> None:
    r = make_route(tmp_path, include=["*.csv", "REPORT_*"])
    start(watchers, [r], collector)
    for name in ("a.txt", "b.csv", "REPORT_1", "report_2"):
        write(r.outbox / name)
    assert collector.wait_for(lambda: set(collector.names) == {"b.csv", "REPORT_1"})
    time.sleep(2 * STABLE)
    assert sorted(collector.names) == ["REPORT_1", "b.csv"]


def test_directories_ignored_and_not_descended(tmp_path: Path, collector: Collector,
                                               watchers: list[OutboxWatcher]) -> None:
    r = make_route(tmp_path)
    r.outbox.mkdir(parents=True)
    (r.outbox / "olddir").mkdir()
    start(watchers, [r], collector)
    (r.outbox / "sub").mkdir()
    write(r.outbox / "sub" / "inner.csv")
    write(r.outbox / "olddir" / "inner2.csv")
    write(r.outbox / "sentinel.csv")
    collector.wait_name("sentinel.csv")
    time.sleep(2 * STABLE)
    assert collector.names == ["sentinel.csv"]


def test_rename_into_outbox_and_tmp_rename(tmp_path: Path, collector: Collector,
                                           watchers: list[OutboxWatcher]) -> None:
    r = make_route(tmp_path)
    start(watchers, [r], collector)
    outside = tmp_path / "elsewhere.csv"
    write(outside, b"12345")
    os.rename(outside, r.outbox / "moved.csv")
    write(r.outbox / "w.csv.tmp", b"abc")
    os.rename(r.outbox / "w.csv.tmp", r.outbox / "w.csv")
    assert collector.wait_for(lambda: sorted(collector.names) == ["moved.csv", "w.csv"])
    assert collector.of("moved.csv")[0].size == 5 and collector.of("w.csv")[0].size == 3
    time.sleep(2 * STABLE)
    assert len(collector.items) == 2


def test_trigger_mode_file_then_trigger(tmp_path: Path, collector: Collector,
                                        watchers: list[OutboxWatcher]) -> None:
    r = make_route(tmp_path, readiness="trigger")
    start(watchers, [r], collector)
    write(r.outbox / "a.csv", b"abc")
    time.sleep(3 * STABLE)
    assert collector.names == []  # stable for a long time, but no trigger yet
    (r.outbox / "a.csv.done").touch()
    (c,) = collector.wait_name("a.csv")
    assert c.trigger == r.outbox / "a.csv.done" and c.size == 3
    time.sleep(2 * STABLE)
    assert collector.names == ["a.csv"]  # the trigger itself is never a candidate


def test_trigger_mode_trigger_then_file(tmp_path: Path, collector: Collector,
                                        watchers: list[OutboxWatcher]) -> None:
    r = make_route(tmp_path, readiness="trigger", trigger_suffix=".ok")
    start(watchers, [r], collector)
    (r.outbox / "b.csv.ok").touch()
    (r.outbox / "c.tmp.ok").touch()  # its data file is an ignored name
    time.sleep(2 * STABLE)
    assert collector.names == []
    write(tmp_path / "x", b"12")
    os.rename(tmp_path / "x", r.outbox / "b.csv")
    write(r.outbox / "c.tmp")
    (c,) = collector.wait_name("b.csv")
    assert c.trigger == r.outbox / "b.csv.ok" and c.size == 2
    time.sleep(2 * STABLE)
    assert collector.names == ["b.csv"]


def test_startup_scan_picks_existing_files(tmp_path: Path, collector: Collector,
                                           watchers: list[OutboxWatcher]) -> None:
    r1 = make_route(tmp_path, "r1")
    r2 = make_route(tmp_path, "r2", readiness="trigger")
    r1.outbox.mkdir(parents=True)
    r2.outbox.mkdir(parents=True)
    write(r1.outbox / "old.csv")
    write(r1.outbox / "old.tmp")
    write(r2.outbox / "t.csv")
    (r2.outbox / "t.csv.done").touch()
    t0 = time.monotonic()
    start(watchers, [r1, r2], collector, rescan_interval=3600)
    assert collector.wait_for(lambda: sorted(collector.names) == ["old.csv", "t.csv"])
    # Seen by the scan only: a full stable window of observation first.
    (got_at,) = [t for t, c in collector.items if c.path.name == "old.csv"]
    assert got_at - t0 >= STABLE
    assert collector.of("t.csv")[0].trigger == r2.outbox / "t.csv.done"


def test_poll_mode_detects_file(tmp_path: Path, collector: Collector, watchers: list[OutboxWatcher]) -> None:
    r = make_route(tmp_path, poll=True)
    w = start(watchers, [r], collector, rescan_interval=3600, poll_interval=0.2)
    assert isinstance(w._watches[r.outbox].observer, PollingObserverVFS)
    write(r.outbox / "p.csv", b"pp")
    (c,) = collector.wait_name("p.csv")
    assert c.size == 2


def test_rescan_finds_file_when_events_are_missed(tmp_path: Path, collector: Collector,
                                                  watchers: list[OutboxWatcher],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    r = make_route(tmp_path)
    w = start(watchers, [r], collector, rescan_interval=0.5)
    monkeypatch.setattr(w, "_on_event", lambda *a: None)  # the observer sees nothing (e.g. a network share)
    write(r.outbox / "missed.csv")
    collector.wait_name("missed.csv", timeout=4)


def test_scan_now_finds_missed_file(tmp_path: Path, collector: Collector, watchers: list[OutboxWatcher],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    r = make_route(tmp_path)
    w = start(watchers, [r], collector, rescan_interval=3600)
    monkeypatch.setattr(w, "_on_event", lambda *a: None)
    write(r.outbox / "missed.csv")
    time.sleep(3 * STABLE)
    assert collector.names == []  # no events, no rescan: nobody knows (this is what rescans are for)
    w.scan_now()
    collector.wait_name("missed.csv")


def test_symlink_emitted_with_flag(tmp_path: Path, collector: Collector, watchers: list[OutboxWatcher]) -> None:
    r = make_route(tmp_path)
    start(watchers, [r], collector)
    target = tmp_path / "secret-elsewhere.csv"
    write(target, b"0123456789" * 10)
    os.symlink(target, r.outbox / "link.csv")
    os.symlink(tmp_path / "nowhere", r.outbox / "dangling.csv")
    assert collector.wait_for(lambda: sorted(collector.names) == ["dangling.csv", "link.csv"])
    (c,) = collector.of("link.csv")
    assert c.is_symlink
    assert c.size == os.lstat(r.outbox / "link.csv").st_size == len(str(target))  # the link, not its target
    assert collector.of("dangling.csv")[0].is_symlink


def test_set_routes_adds_and_removes(tmp_path: Path, collector: Collector, watchers: list[OutboxWatcher]) -> None:
    a = make_route(tmp_path, "a")
    b = make_route(tmp_path, "b", poll=True)
    w = start(watchers, [a], collector, poll_interval=0.2)
    write(a.outbox / "a1.csv")
    collector.wait_name("a1.csv")
    obs_a = w._watches[a.outbox].observer
    assert obs_a is not None
    w.set_routes([b])
    assert b.outbox.is_dir()
    assert not obs_a.is_alive()
    assert w.healthy()
    write(a.outbox / "a2.csv")
    write(b.outbox / "b1.csv")
    (c,) = collector.wait_name("b1.csv")
    assert c.route == b
    time.sleep(2 * STABLE)
    assert "a2.csv" not in collector.names
    assert all(e.outbox == b.outbox for e in w._entries.values())
    # Same outbox, changed patterns: the observer keeps running, the new route applies.
    obs_b = w._watches[b.outbox].observer
    b2 = b.model_copy(update={"include": ["*.txt"]})
    w.set_routes([b2])
    assert w._watches[b.outbox].observer is obs_b
    write(b.outbox / "b2.csv")
    write(b.outbox / "b3.txt")
    (c,) = collector.wait_name("b3.txt")
    assert c.route == b2
    assert "b2.csv" not in collector.names


def test_set_routes_rejects_uncreatable_outbox(tmp_path: Path, collector: Collector,
                                               watchers: list[OutboxWatcher]) -> None:
    a = make_route(tmp_path, "a")
    w = start(watchers, [a], collector)
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    bad = make_route(tmp_path, "bad").model_copy(update={"outbox": blocker / "outbox"})
    with pytest.raises(OSError, match="route bad: cannot create outbox"):
        w.set_routes([a, bad])
    assert list(w._watches) == [a.outbox]  # the old set keeps running
    write(a.outbox / "still.csv")
    collector.wait_name("still.csv")


def test_callback_exception_does_not_kill_watcher(tmp_path: Path, watchers: list[OutboxWatcher],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    got = Collector()

    def cb(c: Candidate) -> None:
        got(c)
        if c.path.name == "boom.csv":
            raise RuntimeError("daemon bug")

    r = make_route(tmp_path)
    w = start(watchers, [r], cb)
    with caplog.at_level(logging.ERROR, logger="filex_agent.watcher"):
        write(r.outbox / "boom.csv")
        got.wait_name("boom.csv")
        write(r.outbox / "after.csv")
        got.wait_name("after.csv")
    assert w.healthy()
    assert any("on_ready failed" in rec.getMessage() and rec.exc_info for rec in caplog.records)


def test_reemit_after_period_change_and_forget(tmp_path: Path, collector: Collector,
                                               watchers: list[OutboxWatcher]) -> None:
    clock = FakeClock()
    r = make_route(tmp_path)
    w = start(watchers, [r], collector, clock=clock, rescan_interval=10.0)
    path = r.outbox / "f.csv"
    write(path, b"one")
    assert wait_until(lambda: path in w._entries and w._entries[path].key is not None)
    time.sleep(0.3)
    assert collector.names == []  # frozen clock: the window has not elapsed
    clock.advance(1.0)
    collector.wait_name("f.csv")
    clock.advance(30.0)
    time.sleep(0.6)
    assert len(collector.of("f.csv")) == 1
    clock.advance(31.0)  # > max(60, rescan_interval) since the emission: the daemon may claim again
    second = collector.wait_name("f.csv", 2)[1]
    assert second.size == 3
    # Changed: back to waiting for stability, then emitted with the new size.
    write(path, b"two-two")
    assert wait_until(lambda: w._entries[path].key is not None and w._entries[path].key[0] == 7)
    time.sleep(0.3)
    assert len(collector.of("f.csv")) == 2
    clock.advance(1.0)
    assert collector.wait_name("f.csv", 3)[2].size == 7
    path.unlink()
    assert wait_until(lambda: w._entries == {})


def test_memory_bounded_to_files_present(tmp_path: Path, collector: Collector,
                                         watchers: list[OutboxWatcher]) -> None:
    r = make_route(tmp_path)
    w = start(watchers, [r], collector)
    for i in range(40):
        write(r.outbox / f"f{i}.csv")
    assert collector.wait_for(lambda: len(collector.items) == 40)
    for i in range(40):
        os.rename(r.outbox / f"f{i}.csv", tmp_path / f"claimed{i}")  # what the daemon's claim does
    assert wait_until(lambda: w._entries == {})


def test_outbox_deleted_unhealthy_then_recovers(tmp_path: Path, collector: Collector,
                                                watchers: list[OutboxWatcher],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watcher_mod, "RESTART_INTERVAL", 0.3)
    r = make_route(tmp_path)
    w = start(watchers, [r], collector)
    assert w.healthy()
    r.outbox.rmdir()
    assert wait_until(lambda: not w.healthy())
    assert not r.outbox.exists()  # not silently recreated (could be an unmounted share)
    r.outbox.mkdir()
    assert wait_until(w.healthy)
    write(r.outbox / "back.csv")
    collector.wait_name("back.csv")


def test_stop_is_idempotent_and_joins(tmp_path: Path, collector: Collector) -> None:
    routes = [make_route(tmp_path, "a"), make_route(tmp_path, "b", poll=True)]
    before = set(threading.enumerate())
    w = OutboxWatcher(routes, collector, poll_interval=0.2)
    w.start()
    assert w.healthy()
    observers = [x.observer for x in w._watches.values()]
    t = w._thread
    assert t is not None and t.is_alive()
    w.stop()
    w.stop()
    assert not w.healthy()
    assert not t.is_alive()
    assert all(o is not None and not o.is_alive() for o in observers)
    assert wait_until(lambda: set(threading.enumerate()) <= before, timeout=3)
    with pytest.raises(RuntimeError):
        w.start()


def test_stop_before_start_and_duplicate_outboxes(tmp_path: Path, collector: Collector) -> None:
    r = make_route(tmp_path)
    w = OutboxWatcher([r], collector)
    w.stop()
    w.stop()
    assert not w.healthy()
    with pytest.raises(ValueError, match="share the outbox"):
        OutboxWatcher([r, r.model_copy(update={"name": "other"})], collector)


def test_a_folder_in_an_outbox_is_reported_once(tmp_path, caplog):
    import logging

    from filex_agent.watcher import OutboxWatcher

    caplog.set_level(logging.WARNING, logger="filex_agent.watcher")
    (tmp_path / "sub").mkdir()
    (tmp_path / ".filex-agent").mkdir()
    OutboxWatcher._list(tmp_path)
    OutboxWatcher._list(tmp_path)
    msgs = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(msgs) == 1 and "'sub'" in msgs[0]


def test_files_ready_in_one_tick_reach_the_batch_callback_together(tmp_path: Path,
                                                                     watchers: list[OutboxWatcher]) -> None:
    r = make_route(tmp_path)
    r.outbox.mkdir(parents=True, exist_ok=True)
    for i in range(20):  # there before the start: the start-up scan finds them all at once
        write(r.outbox / f"b{i:02d}.csv")
    batches: list[list[str]] = []
    single: list[Candidate] = []
    got = threading.Event()

    def on_batch(cands: list[Candidate]) -> None:
        batches.append(sorted(c.path.name for c in cands))
        got.set()

    start(watchers, [r], single.append, on_ready_batch=on_batch)
    assert got.wait(5)
    assert batches[0] == [f"b{i:02d}.csv" for i in range(20)]
    assert single == []  # the per-file callback is not used once a batch callback is given
