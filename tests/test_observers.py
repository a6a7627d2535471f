"""Observers against a real SQLite journal, a real audit file and a real metrics registry."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest

from filex_agent.audit import AuditLog
from filex_agent.config import Config, parse_config
from filex_agent.metrics import Metrics
from filex_agent.notify import Notification, Notifier
from filex_agent.observers import (AuditHooks, MetricsHooks, NotifyHooks, ProblemChecks, feedback_wait_seconds,
                                   operation_label)
from filex_agent.store import State, Store, Submission, open_store, utcnow


def make_config(tmp_path: Path, **sections: dict) -> Config:
    data = {
        "agent": {"data_dir": str(tmp_path / "data")},
        "credentials": {"c": {"client_id": "id", "client_secret": "env:UNUSED_SECRET"}},
        "routes": [{"name": "r1", "outbox": str(tmp_path / "out1"), "org": "0001", "application": "app1",
                    "credential": "c"},
                   {"name": "r2", "outbox": str(tmp_path / "out2"), "org": "0001", "application": "app2",
                    "credential": "c"}],
        **sections,
    }
    return parse_config(data)


@pytest.fixture
def store(tmp_path):
    s = open_store(tmp_path / "journal.sqlite3")
    yield s
    s.close()


def new_sub(store: Store, name: str = "a.csv", route: str = "r1") -> Submission:
    sub = store.create(route=route, org="0001", application="app1", transport="rest", file_name=name,
                       source_path=f"/out/{name}", local_path=f"/spool/{name}", state=State.CLAIMING)
    return store.transition(sub.id, State.QUEUED, "claimed", size=3, sha256="ab" * 32)


def submit(store: Store, sub: Submission) -> Submission:
    sub = store.transition(sub.id, State.UPLOADING, "upload started", upload_started_at=utcnow())
    return store.transition(sub.id, State.SUBMITTED, "uploaded", uploaded_at=utcnow(), tracking_id=f"t-{sub.id}")


def audit_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class RecordingNotifier(Notifier):
    """A real Notifier (no channels: dedup and logging only) that also records what it was asked."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls: list[tuple[Notification, str]] = []
        self.resolved: list[str] = []

    def notify(self, n: Notification, key: str) -> bool:
        self.calls.append((n, key))
        return super().notify(n, key)

    def resolve(self, key: str) -> None:
        self.resolved.append(key)
        super().resolve(key)


# -- audit -------------------------------------------------------------------------------------

def test_audit_one_line_per_journal_event_never_twice(tmp_path, store):
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    hooks = AuditHooks(audit, store)
    sub = new_sub(store)
    hooks.submission_changed(sub, "claimed")
    assert [(r["seq"], r["state"]) for r in audit_lines(path)] == [(1, "CLAIMING"), (2, "QUEUED")]
    # Events no hook announced (upload started) are caught up with the next one.
    sub = submit(store, sub)
    hooks.submission_changed(sub, "uploaded")
    lines = audit_lines(path)
    assert [r["state"] for r in lines] == ["CLAIMING", "QUEUED", "UPLOADING", "SUBMITTED"]
    last = lines[-1]
    assert last["file"] == "a.csv" and last["sha256"] == "ab" * 32 and last["size"] == 3
    assert last["route"] == "r1" and last["org"] == "0001" and last["application"] == "app1"
    assert last["transport"] == "rest" and last["tracking_id"] == f"t-{sub.id}" and last["detail"] == "uploaded"
    hooks.submission_changed(sub, "uploaded")  # a repeated hook call adds nothing
    assert len(audit_lines(path)) == 4

    # Final state, then its feedback file: outcome and feedback are recorded, each once.
    sub = store.transition(sub.id, State.REJECTED, "final: REJECTED", final_at=utcnow(), reason="fix it")
    hooks.submission_changed(sub, "REJECTED")
    fb = store.record_feedback("r1", "a_fb.txt", 10, None, str(tmp_path / "a_fb.txt"), sub.id)
    hooks.submission_changed(sub, "feedback")
    hooks.submission_changed(sub, "feedback")
    lines = audit_lines(path)
    assert lines[4]["outcome"] == "REJECTED" and lines[4]["reason"] == "fix it"
    assert [r["event"] for r in lines].count("submission.feedback") == 1
    assert lines[-1]["feedback_id"] == fb.id and lines[-1]["feedback"] == [str(tmp_path / "a_fb.txt")]
    audit.close()

    # A restart (new index read from the file) re-writes nothing; the chain stays intact.
    audit2 = AuditLog(path)
    hooks2 = AuditHooks(audit2, store)
    assert hooks2.catch_up(sub.id) == 0
    assert audit2.verify().ok
    audit2.close()


def test_audit_two_writers_share_one_index(tmp_path, store):
    """The CLI (`submit`, `release`) and the daemon append to the same file: no line twice."""
    path = tmp_path / "audit.jsonl"
    daemon_side = AuditHooks(AuditLog(path), store)
    cli_side = AuditHooks(AuditLog(path), store)
    sub = new_sub(store)
    cli_side.submission_changed(sub, "claimed")
    sub = submit(store, sub)
    daemon_side.submission_changed(sub, "uploaded")
    assert [(r["submission_id"], r["seq"]) for r in audit_lines(path)] == [(sub.id, i) for i in range(1, 5)]
    assert daemon_side.audit.verify().ok


def test_audit_flag_line(tmp_path, store):
    path = tmp_path / "audit.jsonl"
    hooks = AuditHooks(AuditLog(path), store)
    sub = submit(store, new_sub(store))
    sub = store.update(sub.id, flag="no final status 48 h after upload")
    hooks.submission_changed(sub, "flagged")
    assert audit_lines(path)[-1]["event"] == "submission.flagged"
    assert audit_lines(path)[-1]["flag"] == "no final status 48 h after upload"


# -- metrics -----------------------------------------------------------------------------------

def value(m: Metrics, name: str, **labels) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_metrics_hooks(tmp_path, store):
    m = Metrics()
    now = [1000.0]
    hooks = MetricsHooks(m, store, clock=lambda: now[0])
    queued = new_sub(store, "q.csv")
    hooks.submission_changed(queued, "claimed")
    assert value(m, "filex_queue_depth", route="r1") == 1
    sub = submit(store, new_sub(store, "b.csv"))
    hooks.bytes_sent("r1", "rest", 1000)
    hooks.bytes_sent("r1", "rest", 24)
    hooks.submission_changed(sub, "uploaded")
    assert value(m, "filex_submissions_total", route="r1", transport="rest", outcome="submitted") == 1
    assert value(m, "filex_bytes_sent_total", route="r1", transport="rest") == 1024
    assert value(m, "filex_upload_seconds_count", route="r1", transport="rest") == 1
    assert value(m, "filex_drop_to_submitted_seconds_count", route="r1") == 1
    sub = store.transition(sub.id, State.ACCEPTED, "final: ACCEPTED")
    hooks.submission_changed(sub, "ACCEPTED")
    assert value(m, "filex_submissions_total", route="r1", transport="rest", outcome="accepted") == 1
    hooks.submission_changed(sub, "feedback")  # not an outcome
    assert value(m, "filex_submissions_total", route="r1", transport="rest", outcome="accepted") == 1

    hooks.retry("fileX list 0001/app1/out")
    hooks.retry("FIP access token")
    hooks.retry("fileX upload URL for 0001/app1/in/x.csv")
    assert value(m, "filex_retries_total", operation="list") == 1
    assert value(m, "filex_retries_total", operation="token") == 1
    assert value(m, "filex_retries_total", operation="upload") == 1

    hooks.tracking_polled(False)
    assert value(m, "filex_last_tracking_poll_success_timestamp_seconds") == 0 and hooks.last_poll is None
    hooks.tracking_polled(True)
    assert value(m, "filex_last_tracking_poll_success_timestamp_seconds") == 1000.0

    # Gauges of every configured route; a route removed by a reload disappears.
    hooks.refresh(["r1", "r2"])
    assert value(m, "filex_queue_depth", route="r2") == 0 and value(m, "filex_queue_depth", route="r1") == 1
    store.transition(queued.id, State.FAILED, "failed")
    hooks.refresh(["r1"])
    assert value(m, "filex_queue_depth", route="r2") is None and value(m, "filex_queue_depth", route="r1") == 0


def test_queue_depth_counted_at_most_once_a_second_then_caught_up(store):
    m = Metrics()
    now = [1000.0]
    hooks = MetricsHooks(m, store, clock=lambda: now[0])
    counts = []
    real = store.count
    store.count = lambda *a, **kw: counts.append(a) or real(*a, **kw)  # type: ignore[method-assign]
    for i in range(50):  # a burst: 50 files claimed in the same second
        hooks.submission_changed(new_sub(store, f"f{i}.csv"), "claimed")
    assert len(counts) == 1 and value(m, "filex_queue_depth", route="r1") == 1  # stale, on purpose
    hooks.flush()  # the service's next tick, still within the second: nothing to do yet
    assert len(counts) == 1
    now[0] += 1.0
    hooks.flush()
    assert len(counts) == 2 and value(m, "filex_queue_depth", route="r1") == 50
    hooks.flush()  # nothing changed since
    assert len(counts) == 2


def test_operation_labels_are_few():
    assert operation_label("fileX S3 transfer tokens for 0001/app2") == "s3_tokens"
    assert operation_label("fileX tracking (last 90 days)") == "tracking"
    assert operation_label("fileX download URL for 0001/app1/out/f") == "download"
    assert operation_label("something new") == "other"


def test_token_refreshes_polled_as_deltas(store):
    m = Metrics()
    hooks = MetricsHooks(m, store)
    fip = SimpleNamespace(refreshes=1)
    s3 = SimpleNamespace(fetch_count=2)

    class Conns:  # the Connections.token_counts() contract
        def __init__(self):
            self.fip, self.s3 = {"c": fip}, {"c": s3}

        def token_counts(self):
            return ([("fip", p, p.refreshes) for p in self.fip.values()]
                    + [("s3", c, c.fetch_count) for c in self.s3.values()])

    conns = Conns()
    hooks.poll_token_refreshes(conns)
    fip.refreshes = 3
    hooks.poll_token_refreshes(conns)
    hooks.poll_token_refreshes(conns)
    assert value(m, "filex_token_refreshes_total", kind="fip") == 3
    assert value(m, "filex_token_refreshes_total", kind="s3") == 2
    # A reload builds new providers: their counts start over and are added, not subtracted.
    conns.fip = {"c": SimpleNamespace(refreshes=1)}
    hooks.poll_token_refreshes(conns)
    assert value(m, "filex_token_refreshes_total", kind="fip") == 4


# -- notifications -----------------------------------------------------------------------------

def test_rejected_alert_waits_for_feedback_and_names_it(tmp_path, store):
    cfg = make_config(tmp_path)
    notifier = RecordingNotifier()
    clock = [0.0]
    hooks = NotifyHooks(notifier, store, cfg, clock=lambda: clock[0])
    sub = submit(store, new_sub(store, "REJECT_a.csv"))
    sub = store.transition(sub.id, State.REJECTED, "final: REJECTED", reason="FINRA rejected the file")
    hooks.submission_changed(sub, "REJECTED")
    assert notifier.calls == [] and hooks.pending() == [sub.id]
    fb = tmp_path / "REJECT_a_fb.txt"
    store.record_feedback("r1", fb.name, 5, None, str(fb), sub.id)
    hooks.submission_changed(store.get(sub.id), "feedback")
    (n, key), = notifier.calls
    assert key == f"REJECTED:{sub.id}" and n.kind == "REJECTED" and n.file == "REJECT_a.csv"
    assert n.feedback == [str(fb)] and "REJECT_a.csv" in n.render() and str(fb) in n.render()
    hooks.submission_changed(store.get(sub.id), "feedback")  # a second feedback file: no second alert
    assert len(notifier.calls) == 1


def test_rejected_alert_sent_without_feedback_after_the_bound(tmp_path, store):
    cfg = make_config(tmp_path)
    notifier = RecordingNotifier()
    clock = [0.0]
    hooks = NotifyHooks(notifier, store, cfg, clock=lambda: clock[0])
    assert hooks.feedback_wait == feedback_wait_seconds(cfg) == 120.0  # two 60 s tracking polls
    sub = submit(store, new_sub(store, "PARTIAL_b.csv"))
    sub = store.transition(sub.id, State.PARTIALLY_REJECTED, "final: PARTIALLY_REJECTED")
    hooks.submission_changed(sub, "PARTIALLY_REJECTED")
    clock[0] = 119.0
    assert hooks.flush_due() == 0 and notifier.calls == []
    clock[0] = 121.0
    assert hooks.flush_due() == 1
    (n, _), = notifier.calls
    assert n.kind == "PARTIALLY_REJECTED" and n.feedback == []
    text = n.render()
    assert "none downloaded yet" in text
    assert str(cfg.route("r1").folder("feedback", cfg.agent.data_dir)) in text
    assert hooks.flush_due() == 0


def test_rejected_alert_waiting_for_feedback_survives_a_restart_and_is_sent_once(tmp_path):
    """Killed while the REJECTED alert waited for its feedback: the next start takes it up from
    the journal, sends it once when the feedback is filed, and a later start sends nothing."""
    cfg = make_config(tmp_path)
    journal = tmp_path / "journal.sqlite3"
    store = open_store(journal)
    first = RecordingNotifier()
    hooks = NotifyHooks(first, store, cfg)
    assert hooks.resume() == 0
    sub = submit(store, new_sub(store, "REJECT_k.csv"))
    sub = store.transition(sub.id, State.REJECTED, "final: REJECTED", final_at=utcnow())
    hooks.submission_changed(sub, "REJECTED")
    assert hooks.pending() == [sub.id] and first.calls == []
    store.close()  # SIGKILL: nothing flushed

    store = open_store(journal)
    second = RecordingNotifier()
    clock = [0.0]
    hooks = NotifyHooks(second, store, cfg, clock=lambda: clock[0])
    assert hooks.resume() == 1 and hooks.pending() == [sub.id]
    assert hooks.flush_due() == 0 and second.calls == []  # still waiting for the feedback
    fb = tmp_path / "REJECT_k_fb.txt"
    store.record_feedback("r1", fb.name, 5, None, str(fb), sub.id)
    hooks.submission_changed(store.get(sub.id), "feedback")
    (n, key), = second.calls
    assert key == f"REJECTED:{sub.id}" and n.feedback == [str(fb)]
    clock[0] = 10_000.0
    assert hooks.flush_due(force=True) == 0 and len(second.calls) == 1
    store.close()

    store = open_store(journal)
    third = RecordingNotifier()
    hooks = NotifyHooks(third, store, cfg)
    assert hooks.resume() == 0 and hooks.pending() == []
    hooks.submission_changed(store.get(sub.id), "feedback")
    assert third.calls == []
    store.close()


def test_rejected_alert_whose_wait_ran_out_while_stopped_goes_out_after_one_poll(tmp_path, store):
    cfg = make_config(tmp_path)
    sub = submit(store, new_sub(store, "PARTIAL_z.csv"))
    store.transition(sub.id, State.PARTIALLY_REJECTED, "final", final_at=utcnow() - timedelta(hours=3))
    notifier = RecordingNotifier()
    clock = [0.0]
    hooks = NotifyHooks(notifier, store, cfg, clock=lambda: clock[0])
    assert hooks.resume() == 1
    assert hooks.flush_due() == 0  # one tracking poll first: the feedback cycle may still file it
    clock[0] = cfg.tracking.poll_interval_seconds
    assert hooks.flush_due() == 1
    (n, _), = notifier.calls
    assert n.kind == "PARTIALLY_REJECTED" and n.feedback == []


def test_older_journal_does_not_alert_its_history_again(tmp_path):
    """A journal from before alerts were journaled: its REJECTED rows count as alerted."""
    import sqlite3

    journal = tmp_path / "journal.sqlite3"
    store = open_store(journal)
    sub = submit(store, new_sub(store, "REJECT_old.csv"))
    store.transition(sub.id, State.REJECTED, "final", final_at=utcnow())
    store.close()
    with sqlite3.connect(journal) as db:
        db.execute("DROP TABLE alerts")
    db.close()
    store = open_store(journal)
    try:
        hooks = NotifyHooks(RecordingNotifier(), store, make_config(tmp_path))
        assert hooks.resume() == 0
    finally:
        store.close()


def test_failed_alert_at_once(tmp_path, store):
    cfg = make_config(tmp_path)
    notifier = RecordingNotifier()
    hooks = NotifyHooks(notifier, store, cfg)
    sub = new_sub(store, "bad#name.txt")
    sub = store.transition(sub.id, State.FAILED, "failed", reason="file name contains '#'",
                           local_path=str(tmp_path / "failed" / "bad#name.txt"))
    hooks.submission_changed(sub, "FAILED")
    hooks.submission_changed(sub, "ACCEPTED")  # not an alert (and not this sub's state, but harmless)
    (n, key), = notifier.calls
    assert key == f"FAILED:{sub.id}" and "contains '#'" in n.text and "failed/bad#name.txt" in n.text


# -- problem checks ----------------------------------------------------------------------------

def test_stuck_alert_then_resolved(tmp_path, store):
    cfg = make_config(tmp_path, tracking={"final_timeout_hours": 2})
    notifier = RecordingNotifier()
    now = [utcnow()]
    checks = ProblemChecks(cfg, store, notifier, clock=lambda: now[0])
    sub = submit(store, new_sub(store, "slow.csv"))
    assert checks.run() == set()
    now[0] += timedelta(hours=2, minutes=1)
    assert checks.run() == {f"STUCK:{sub.id}"}
    n, _ = notifier.calls[-1]
    assert n.kind == "STUCK" and n.file == "slow.csv" and "no final status" in n.subject
    assert checks.run() == {f"STUCK:{sub.id}"}  # ongoing: the Notifier deduplicates re-sends
    assert notifier.resolved == []
    store.transition(sub.id, State.ACCEPTED, "final: ACCEPTED")
    assert checks.run() == set()
    assert notifier.resolved == [f"STUCK:{sub.id}"]


def _retrying(store: Store, name: str, route: str) -> Submission:
    sub = new_sub(store, name, route=route)
    sub = store.transition(sub.id, State.UPLOADING, "upload started", upload_started_at=utcnow())
    sub = store.update(sub.id, attempts=1)
    return store.transition(sub.id, State.QUEUED, "retry", reason="fileX answered HTTP 503; will retry")


def test_route_down_then_resolved(tmp_path, store):
    cfg = make_config(tmp_path, notify={"route_down_minutes": 30})
    notifier = RecordingNotifier()
    now = [utcnow()]
    checks = ProblemChecks(cfg, store, notifier, clock=lambda: now[0])
    sub = _retrying(store, "x.csv", "r1")
    new_sub(store, "fresh.csv", route="r2")  # queued for the first time: not a failure
    now[0] += timedelta(minutes=29)
    assert checks.run() == set()
    now[0] += timedelta(minutes=2)
    assert checks.run() == {"ROUTE_DOWN:r1"}
    n, _ = notifier.calls[-1]
    assert n.kind == "ROUTE_DOWN" and n.route == "r1" and "HTTP 503" in n.text and "doctor" in n.text
    # The route recovers: the file is uploaded.
    sub = submit(store, sub)
    checks.submission_changed(sub, "uploaded")
    assert checks.run() == set() and notifier.resolved == ["ROUTE_DOWN:r1"]


def test_route_not_down_while_waiting_for_its_submission_window(tmp_path, store):
    """A file that failed once and then waits overnight for the route's window is not an outage."""
    from filex_agent.filing_calendar import WINDOW_REASON

    cfg = make_config(tmp_path, notify={"route_down_minutes": 30})
    checks = ProblemChecks(cfg, store, RecordingNotifier(), clock=lambda: now[0])
    now = [utcnow()]
    sub = _retrying(store, "late.csv", "r1")
    store.update(sub.id, reason=f"{WINDOW_REASON}: outside the submission window; goes out at 06:00",
                 next_attempt_at=now[0] + timedelta(hours=10))
    now[0] += timedelta(hours=9)
    assert checks.run() == set()


def test_route_not_down_while_other_files_get_through(tmp_path, store):
    cfg = make_config(tmp_path, notify={"route_down_minutes": 30})
    notifier = RecordingNotifier()
    now = [utcnow()]
    checks = ProblemChecks(cfg, store, notifier, clock=lambda: now[0])
    _retrying(store, "one-bad.csv", "r1")
    now[0] += timedelta(minutes=31)
    ok = submit(store, new_sub(store, "ok.csv"))
    store.update(ok.id, uploaded_at=now[0] - timedelta(minutes=1))
    checks.submission_changed(store.get(ok.id), "uploaded")
    assert checks.run() == set()
