"""The filing calendar against the sandbox: the example expectation `run --sandbox` writes is met
by a real drop (EXPECTED -> ACCEPTED), and a route's submission window holds a real upload."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

from filex_agent.config import BlackoutSettings, SubmissionWindowSettings
from filex_agent.daemon import Daemon
from filex_agent.filing_calendar import CalendarWatch
from filex_agent.store import State, utcnow
from tests.conftest import wait_for

NY = ZoneInfo("America/New_York")


def _not_at_the_deadline() -> None:
    """The demo expectation is due 23:59 New York time: a run in that last minute would find
    today's deadline passed. Wait for the next day instead (at most a few minutes, rarely)."""
    local = datetime.now(NY)
    if local.hour == 23 and local.minute >= 57:
        midnight = (local + timedelta(days=1)).replace(hour=0, minute=0, second=5, microsecond=0)
        time.sleep((midnight - local).total_seconds())


def test_daily_expectation_met_by_a_real_drop(sandbox, sandbox_config, capsys):
    from filex_agent.cli import main

    _not_at_the_deadline()
    cfg = sandbox_config(transports=("rest",))
    exp = cfg.expectations[0]
    assert (exp.name, exp.route, exp.pattern, exp.recurrence, exp.due) == \
        ("daily-demo", "rest-0001-app1", "daily-*", "calendar_day", "23:59")
    d = Daemon(cfg, dispatch_interval=0.2)
    watch = CalendarWatch(cfg, d.store)
    d.start()
    try:
        [occ] = watch.run()
        assert occ.state == "EXPECTED" and occ.label == datetime.now(NY).date().isoformat()
        assert occ.deadline == datetime.combine(datetime.now(NY).date(), datetime.min.time().replace(
            hour=23, minute=59), tzinfo=NY).astimezone(timezone.utc)
        (Path(cfg.routes[0].outbox) / "other-report.csv").write_bytes(b"not the daily file\n")
        (Path(cfg.routes[0].outbox) / "daily-report.csv").write_bytes(b"id,value\n1,2\n")
        sub = wait_for(lambda: next((s for s in d.store.list() if s.file_name == "daily-report.csv"
                                     and s.state is State.ACCEPTED), None), timeout=30, what="daily file ACCEPTED")
        wait_for(lambda: all(s.is_final for s in d.store.list()), timeout=30, what="every file final")
        states = [o.state for o in watch.run()] + [o.state for o in d.store.occurrences()]
        assert states == ["ACCEPTED"]  # closed once accepted: not among the open ones
        occ = d.store.occurrences()[0]
        assert (occ.submission_id, occ.on_time, occ.verdict) == (sub.id, True, "ACCEPTED")
    finally:
        d.stop(grace=5)
    cfg_path = Path(cfg.agent.data_dir).parent / "filex-agent.toml"
    assert main(["calendar", "--config", str(cfg_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    today = next(r for r in rows if r["journaled"])
    assert (today["status"], today["file"], today["verdict"]) == ("ACCEPTED (on time)", "daily-report.csv",
                                                                   "ACCEPTED")
    assert any(not r["journaled"] and r["state"] == "EXPECTED" for r in rows)  # the coming days


def test_submission_window_holds_a_real_upload_until_it_opens(sandbox, sandbox_config):
    cfg = sandbox_config(transports=("rest",))
    start = utcnow() - timedelta(minutes=1)
    end = utcnow() + timedelta(seconds=4)
    window = SubmissionWindowSettings(days="every_day", blackouts=[
        BlackoutSettings(start=start, end=end, reason="declared FINRA maintenance")])
    route = cfg.routes[0].model_copy(update={"submission_window": window})
    cfg = cfg.model_copy(update={"routes": [route]})
    d = Daemon(cfg, dispatch_interval=0.2)
    d.start()
    try:
        (Path(route.outbox) / "windowed.csv").write_bytes(b"id,value\n1,2\n")
        held = wait_for(lambda: next((s for s in d.store.list() if s.reason and "window" in s.reason), None),
                        timeout=20, what="the file held for the window")
        assert held.state is State.QUEUED and "declared FINRA maintenance" in held.reason
        assert abs((held.next_attempt_at - end).total_seconds()) < 1e-3
        assert not any(u.name == "windowed.csv" for u in sandbox.uploads())
        sub = wait_for(lambda: (s := d.store.get(held.id)).state is State.ACCEPTED and s, timeout=30,
                       what="the file sent once the window opened")
        up = [u for u in sandbox.uploads() if u.name == "windowed.csv"]
        assert len(up) == 1 and sub.uploaded_at >= end and sub.reason is None
    finally:
        d.stop(grace=5)
