"""The filing calendar, with an injected clock: schedules on the NYSE calendar (holidays, early
closes, DST), occurrence states from real journal rows, alerts through a real webhook receiver,
restarts, submission windows, and config validation."""

from __future__ import annotations

import copy
import json
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from filex_agent.config import ConfigError, parse_config
from filex_agent.filing_calendar import (CalendarWatch, Schedule, calendar_rows, hold_for_window, local_instant,
                                         window_allows)
from filex_agent.metrics import Metrics
from filex_agent.notify import Notifier
from filex_agent.store import State, Submission
from filex_agent.store.sqlite import SQLiteStore
from tests.test_notify import Receiver

NY = ZoneInfo("America/New_York")
UTC = timezone.utc


def ny(y: int, m: int, d: int, hh: int = 0, mm: int = 0) -> datetime:
    return datetime(y, m, d, hh, mm, tzinfo=NY).astimezone(UTC)


BASE = {"agent": {"data_dir": "/tmp/filex-cal"},
        "credentials": {"main": {"client_id": "acme", "client_secret": "env:FILEX_SECRET"}},
        "routes": [{"name": "r1", "outbox": "/tmp/filex-cal-out", "org": "0001", "application": "app1",
                    "credential": "main"}]}
DAILY = {"name": "daily", "route": "r1", "pattern": "TRADES_*", "recurrence": "business_day", "due": "18:00"}


def make_config(*expectations: dict, realert: float = 3600, window: dict | None = None):
    data = copy.deepcopy(BASE)
    data["expectations"] = [dict(e) for e in expectations]
    data["notify"] = {"realert_seconds": realert}
    if window is not None:
        data["routes"][0]["submission_window"] = window
    return parse_config(data)


def schedule(**kw) -> Schedule:
    return Schedule(make_config({**DAILY, **kw}).expectations[0])


class Clock:
    def __init__(self, t: datetime):
        self.t = t

    def __call__(self) -> datetime:
        return self.t


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


class Agent:
    """The calendar's part of a running agent: journal, notifier (real webhook), metrics."""

    def __init__(self, cfg, path: Path, clock: Clock, receiver: Receiver):
        self.store = SQLiteStore(path)
        self.notifier = Notifier(webhook_url=receiver.url, realert_seconds=cfg.notify.realert_seconds,
                                 clock=lambda: clock().timestamp(), max_attempts=1)
        self.metrics = Metrics()
        self.changes: list[tuple[str, str | None, str]] = []
        self.watch = CalendarWatch(cfg, self.store, self.notifier, self.metrics, clock=clock,
                                   on_change=lambda o, prev: self.changes.append((o.label, prev, o.state)))
        self.receiver = receiver

    def run(self):
        occs = self.watch.run()
        assert self.notifier.flush(10)
        return occs

    def alerts(self) -> list[str]:
        return [p["kind"] + " " + p["subject"].split(":")[0] for _, p in self.receiver.requests]

    def occ(self, label: str):
        return next(o for o in self.store.occurrences() if o.label == label)

    # Journal rows as the pipeline writes them, at the clock's times.
    def drop(self, name: str, at: datetime) -> Submission:
        return self.store.create(route="r1", org="0001", application="app1", transport="rest", file_name=name,
                                 source_path=f"/out/{name}", local_path=f"/spool/{name}", state=State.QUEUED,
                                 created_at=at)

    def uploaded(self, sub: Submission, at: datetime) -> None:
        self.store.transition(sub.id, State.SUBMITTED, "uploaded", uploaded_at=at)

    def verdict(self, sub: Submission, state: State, at: datetime) -> None:
        self.store.transition(sub.id, state, state.value, final_at=at)

    def close(self):
        self.notifier.stop(5)
        self.store.close()


@pytest.fixture
def agent_factory(tmp_path, receiver):
    made: list[Agent] = []

    def make(cfg, clock: Clock) -> Agent:
        a = Agent(cfg, tmp_path / "journal.sqlite3", clock, receiver)
        made.append(a)
        return a

    yield make
    for a in made:
        try:
            a.close()
        except Exception:  # noqa: BLE001 - closed by the test already
            pass


def started(agent_factory, at: datetime) -> tuple[Clock, Agent]:
    """An agent with the DAILY expectation whose calendar has run once at ``at``."""
    clock = Clock(at)
    a = agent_factory(make_config(DAILY), clock)
    a.run()
    return clock, a


# -- schedules on the exchange calendar -------------------------------------------------------

def test_thanksgiving_week_and_the_early_close():
    """The day before Thanksgiving is a normal NYSE day; Thanksgiving is closed; the day after
    closes at 1 pm, and ``early_close_due`` moves that day's deadline."""
    plain = schedule().slots(ny(2026, 11, 24), ny(2026, 11, 30, 23))
    assert [s.label for s in plain] == ["2026-11-24", "2026-11-25", "2026-11-27", "2026-11-30"]
    wed = plain[1]
    assert wed.deadline == ny(2026, 11, 25, 18) and not wed.early_close
    # The Wednesday's period runs to Friday 00:00: a file late on Wednesday night is Wednesday's.
    assert wed.closes_at == ny(2026, 11, 26) and plain[2].opens_at == ny(2026, 11, 26)
    assert plain[2].deadline == ny(2026, 11, 27, 18)
    early = schedule(early_close_due="13:00").slots(ny(2026, 11, 24), ny(2026, 11, 30, 23))
    fri = next(s for s in early if s.label == "2026-11-27")
    assert fri.early_close and fri.deadline == ny(2026, 11, 27, 13) == datetime(2026, 11, 27, 18, tzinfo=UTC)
    assert next(s for s in early if s.label == "2026-11-25").deadline == ny(2026, 11, 25, 18)


def test_good_friday_moves_focus_and_christmas_rolls_fixed_days():
    focus = schedule(recurrence="quarter_end", business_days_after=17, due="17:00")
    q1 = next(s for s in focus.slots(ny(2026, 3, 1), ny(2026, 6, 1)) if s.label == "2026-Q1")
    # 17 business days after Tue 31 March, Good Friday (3 April) not counted: Friday 24 April.
    assert q1.deadline == ny(2026, 4, 24, 17) == datetime(2026, 4, 24, 21, tzinfo=UTC)
    assert q1.opens_at == ny(2026, 4, 1) and q1.closes_at == ny(2026, 7, 1)
    assert "2026-04-03" not in [s.label for s in schedule().slots(ny(2026, 3, 30), ny(2026, 4, 8))]
    # Fixed day 25: Christmas (Friday) moves to the 24th (an early close), or to Monday 28th.
    prev = schedule(recurrence="days_of_month", days=[25], roll="previous", due="17:00",
                    early_close_due="12:00").slots(ny(2026, 12, 1), ny(2026, 12, 31))
    assert [(s.label, s.deadline, s.early_close) for s in prev] == [("2026-12-25", ny(2026, 12, 24, 12), True)]
    nxt = schedule(recurrence="days_of_month", days=[25], roll="next", due="17:00").slots(
        ny(2026, 12, 1), ny(2026, 12, 31))
    assert [s.deadline for s in nxt] == [ny(2026, 12, 28, 17)]


def test_fifteenth_and_last_day_moved_to_the_previous_business_day():
    s = schedule(recurrence="days_of_month", days=[15, -1], roll="previous", due="17:00")
    got = [(x.label, x.deadline) for x in s.slots(ny(2026, 2, 1), ny(2026, 3, 31, 23))]
    # 15 Feb 2026 is a Sunday (16th is Presidents' Day): Friday 13th; 28 Feb is a Saturday: 27th.
    assert got == [("2026-02-15", ny(2026, 2, 13, 17)), ("2026-02-28", ny(2026, 2, 27, 17)),
                   ("2026-03-15", ny(2026, 3, 13, 17)), ("2026-03-31", ny(2026, 3, 31, 17))]


def test_fixed_days_rolled_onto_one_business_day_make_one_deadline():
    # 31 Jan 2026 is a Saturday and 1 Feb a Sunday: both roll back to Friday 30 January.
    s = schedule(recurrence="days_of_month", days=[1, -1], roll="previous", due="17:00")
    got = [(x.label, x.deadline) for x in s.slots(ny(2026, 1, 20), ny(2026, 2, 5))]
    assert got == [("2026-01-31", ny(2026, 1, 30, 17))]


def test_quarter_end_on_a_weekend():
    focus = schedule(recurrence="quarter_end", business_days_after=17, due="17:00")
    q4 = next(s for s in focus.slots(ny(2023, 12, 1), ny(2024, 3, 1)) if s.label == "2023-Q4")
    # Q4 2023 ended on Sunday 31 Dec; New Year's Day and MLK Day (15 Jan) are not counted.
    assert q4.deadline == ny(2024, 1, 25, 17)
    assert q4.opens_at == ny(2024, 1, 1)
    monthly = schedule(recurrence="month_end", business_days_after=1, due="17:00")
    may = next(s for s in monthly.slots(ny(2026, 5, 1), ny(2026, 7, 1)) if s.label == "2026-05")
    assert may.deadline == ny(2026, 6, 1, 17)  # May 2026 ends on a Sunday


def test_dst_changes():
    daily = schedule().slots(ny(2026, 3, 5), ny(2026, 3, 10))
    utc = {s.label: s.deadline for s in daily}
    assert utc["2026-03-06"] == datetime(2026, 3, 6, 23, tzinfo=UTC)  # EST
    assert utc["2026-03-09"] == datetime(2026, 3, 9, 22, tzinfo=UTC)  # EDT
    autumn = {s.label: s.deadline for s in schedule().slots(ny(2026, 10, 29), ny(2026, 11, 3))}
    assert autumn["2026-10-30"] == datetime(2026, 10, 30, 22, tzinfo=UTC)
    assert autumn["2026-11-02"] == datetime(2026, 11, 2, 23, tzinfo=UTC)
    # A 23-hour and a 25-hour day.
    every = {s.label: s for s in schedule(recurrence="calendar_day", due="12:00").slots(
        ny(2026, 3, 7), ny(2026, 11, 2))}
    assert every["2026-03-08"].closes_at - every["2026-03-08"].opens_at == timedelta(hours=23)
    assert every["2026-11-01"].closes_at - every["2026-11-01"].opens_at == timedelta(hours=25)
    # Skipped and repeated local times.
    assert local_instant(date(2026, 3, 8), datetime(2026, 1, 1, 2, 30).time(), NY) == datetime(2026, 3, 8, 7, 30,
                                                                                               tzinfo=UTC)
    assert local_instant(date(2026, 11, 1), datetime(2026, 1, 1, 1, 30).time(), NY) == datetime(2026, 11, 1, 5, 30,
                                                                                                tzinfo=UTC)
    cron = schedule(recurrence="cron", due=None, cron="30 2 * * *").slots(ny(2026, 3, 7), ny(2026, 3, 10))
    assert [s.deadline for s in cron] == [datetime(2026, 3, 7, 7, 30, tzinfo=UTC),
                                          datetime(2026, 3, 8, 7, 30, tzinfo=UTC),
                                          datetime(2026, 3, 9, 6, 30, tzinfo=UTC)]


def test_cron_weekdays_mean_what_crontab_means():
    """APScheduler 3 counts weekdays from Monday = 0; crontab from Sunday = 0. "1-5" is Monday
    to Friday here, and the deadlines skip no holiday (cron is the escape hatch, not a calendar)."""
    s = schedule(recurrence="cron", due=None, cron="0 18 * * 1-5")
    got = [x.deadline for x in s.slots(ny(2026, 11, 21), ny(2026, 11, 30, 23))]
    assert got == [ny(2026, 11, d, 18) for d in (23, 24, 25, 26, 27, 30)]
    sundays = schedule(recurrence="cron", due=None, cron="30 9 * * 0,7").slots(ny(2026, 11, 21), ny(2026, 12, 7))
    assert [x.deadline for x in sundays] == [ny(2026, 11, 22, 9, 30), ny(2026, 11, 29, 9, 30), ny(2026, 12, 6, 9, 30)]
    every_other = schedule(recurrence="cron", due=None, cron="0 12 * * */2").slots(ny(2026, 11, 21), ny(2026, 11, 28))
    assert [x.deadline.astimezone(NY).strftime("%a") for x in every_other] == ["Sat", "Sun", "Tue", "Thu"]


# -- occurrences and alerts --------------------------------------------------------------------

def test_on_time_filing_goes_expected_dropped_submitted_accepted(agent_factory):
    clock, a = started(agent_factory, ny(2026, 11, 24, 9))
    assert a.occ("2026-11-24").state == "EXPECTED"
    sub = a.drop("TRADES_20261124.csv", ny(2026, 11, 24, 10))
    a.drop("OTHER_20261124.csv", ny(2026, 11, 24, 10))  # another pattern: not this expectation's
    clock.t = ny(2026, 11, 24, 10, 1)
    a.run()
    assert (a.occ("2026-11-24").state, a.occ("2026-11-24").submission_id) == ("DROPPED", sub.id)
    a.uploaded(sub, ny(2026, 11, 24, 10, 2))
    a.run()
    assert a.occ("2026-11-24").state == "SUBMITTED"
    a.verdict(sub, State.ACCEPTED, ny(2026, 11, 24, 10, 30))
    clock.t = ny(2026, 11, 24, 10, 31)
    a.run()
    occ = a.occ("2026-11-24")
    assert (occ.state, occ.on_time, occ.verdict, occ.closed) == ("ACCEPTED", True, "ACCEPTED", True)
    assert a.alerts() == []
    assert a.changes == [("2026-11-24", None, "EXPECTED"), ("2026-11-24", "EXPECTED", "DROPPED"),
                         ("2026-11-24", "DROPPED", "SUBMITTED"), ("2026-11-24", "SUBMITTED", "ACCEPTED")]
    sample = a.metrics.registry.get_sample_value
    assert sample("filex_calendar_occurrences", {"expectation": "daily", "state": "ACCEPTED"}) == 1
    assert sample("filex_calendar_next_deadline_timestamp_seconds", {"expectation": "daily"}) == \
        ny(2026, 11, 24, 18).timestamp()


def test_not_dropped_and_at_risk_alert_before_the_deadline(agent_factory):
    clock, a = started(agent_factory, ny(2026, 11, 25, 16, 59))
    assert a.alerts() == []
    clock.t = ny(2026, 11, 25, 17, 0)  # warn_before_minutes = 60
    a.run()
    a.run()
    assert a.alerts() == ["NOT_DROPPED daily 2026-11-25"]
    sub = a.drop("TRADES_1125.csv", ny(2026, 11, 25, 17, 10))
    a.uploaded(sub, ny(2026, 11, 25, 17, 11))
    clock.t = ny(2026, 11, 25, 17, 12)
    a.run()
    assert a.alerts() == ["NOT_DROPPED daily 2026-11-25", "AT_RISK daily 2026-11-25"]
    assert a.store.calendar_alerts("daily", ny(2026, 11, 25, 18))["NOT_DROPPED"].cleared_at == clock.t
    a.verdict(sub, State.ACCEPTED, ny(2026, 11, 25, 17, 40))
    clock.t = ny(2026, 11, 25, 17, 41)
    a.run()
    assert a.store.calendar_alerts("daily", ny(2026, 11, 25, 18))["AT_RISK"].cleared_at == clock.t
    assert len(a.alerts()) == 2
    body = a.receiver.requests[1][1]
    assert body["route"] == "r1" and body["file"] == "TRADES_1125.csv" and body["submission_id"] == sub.id


def test_file_after_the_deadline_is_accepted_late(agent_factory):
    clock = Clock(ny(2026, 11, 27, 9))
    a = agent_factory(make_config({**DAILY, "early_close_due": "13:00"}), clock)
    a.run()
    clock.t = ny(2026, 11, 27, 13, 5)  # the early close's deadline (13:00) has passed
    a.run()
    assert a.occ("2026-11-27").state == "MISSED"
    assert a.alerts() == ["MISSED daily 2026-11-27"]  # no run inside the warning hour: no NOT_DROPPED
    sub = a.drop("TRADES_1127.csv", ny(2026, 11, 27, 15))
    a.uploaded(sub, ny(2026, 11, 27, 15, 1))
    clock.t = ny(2026, 11, 27, 15, 2)
    a.run()
    assert (a.occ("2026-11-27").state, a.occ("2026-11-27").submission_id) == ("MISSED", sub.id)
    a.verdict(sub, State.ACCEPTED, ny(2026, 11, 27, 15, 30))
    clock.t = ny(2026, 11, 27, 15, 31)
    a.run()
    occ = a.occ("2026-11-27")
    assert (occ.state, occ.on_time, occ.closed) == ("ACCEPTED", False, True)
    assert a.store.calendar_alerts("daily", occ.deadline)["MISSED"].cleared_at == clock.t
    rows = calendar_rows(a.watch.config, a.store, ny(2026, 11, 27), ny(2026, 12, 2), now=clock.t)
    first = rows[0]
    assert (first["period"], first["status"], first["file"], first["verdict"]) == \
        ("2026-11-27", "ACCEPTED (late)", "TRADES_1127.csv", "ACCEPTED")
    assert first["deadline_local"] == "2026-11-27 13:00 EST early close"
    assert [r["period"] for r in rows[1:]] == ["2026-11-30", "2026-12-01"]
    assert all(r["state"] == "EXPECTED" and not r["journaled"] for r in rows[1:])


@pytest.mark.parametrize("verdict", [State.REJECTED, State.PARTIALLY_REJECTED])
def test_rejected_file_corrected_in_time(agent_factory, verdict):
    clock, a = started(agent_factory, ny(2026, 11, 24, 9))
    bad = a.drop("TRADES_1124.csv", ny(2026, 11, 24, 9, 30))
    a.uploaded(bad, ny(2026, 11, 24, 9, 31))
    a.verdict(bad, verdict, ny(2026, 11, 24, 10))
    clock.t = ny(2026, 11, 24, 10, 1)
    a.run()
    a.run()
    assert a.occ("2026-11-24").state == verdict.value
    assert a.alerts() == ["REJECTED_BEFORE_DUE daily 2026-11-24"]
    fixed = a.drop("TRADES_1124_fixed.csv", ny(2026, 11, 24, 11))
    clock.t = ny(2026, 11, 24, 11, 1)
    a.run()
    assert a.occ("2026-11-24").state == "DROPPED"
    a.uploaded(fixed, ny(2026, 11, 24, 11, 2))
    a.verdict(fixed, State.ACCEPTED, ny(2026, 11, 24, 12))
    clock.t = ny(2026, 11, 24, 18, 30)  # after the deadline: nothing missed
    a.run()
    occ = a.occ("2026-11-24")
    assert (occ.state, occ.on_time, occ.submission_id) == ("ACCEPTED", True, fixed.id)
    assert a.alerts() == ["REJECTED_BEFORE_DUE daily 2026-11-24"]


def test_rejected_and_not_corrected_is_missed(agent_factory):
    clock, a = started(agent_factory, ny(2026, 11, 24, 9))
    bad = a.drop("TRADES_1124.csv", ny(2026, 11, 24, 9, 30))
    a.uploaded(bad, ny(2026, 11, 24, 9, 31))
    a.verdict(bad, State.REJECTED, ny(2026, 11, 24, 10))
    clock.t = ny(2026, 11, 24, 18, 1)
    a.run()
    assert a.occ("2026-11-24").state == "MISSED"
    assert a.alerts()[-1] == "MISSED daily 2026-11-24"


def test_submitted_in_time_is_not_missed_while_the_verdict_is_pending(agent_factory):
    clock, a = started(agent_factory, ny(2026, 11, 24, 9))
    sub = a.drop("TRADES_1124.csv", ny(2026, 11, 24, 17, 50))
    a.uploaded(sub, ny(2026, 11, 24, 17, 55))
    clock.t = ny(2026, 11, 24, 18, 30)
    a.run()
    assert a.occ("2026-11-24").state == "SUBMITTED"
    assert "MISSED daily 2026-11-24" not in a.alerts()
    a.verdict(sub, State.ACCEPTED, ny(2026, 11, 24, 19))  # the verdict came late; the filing did not
    clock.t = ny(2026, 11, 24, 19, 1)
    a.run()
    assert (a.occ("2026-11-24").state, a.occ("2026-11-24").on_time) == ("ACCEPTED", True)


def test_nobody_files_missed_once_then_realerted(agent_factory):
    clock = Clock(ny(2026, 11, 24, 12))
    a = agent_factory(make_config(DAILY, realert=3600), clock)
    a.run()
    clock.t = ny(2026, 11, 24, 17, 30)
    a.run()
    for minute in range(0, 60, 5):  # 18:01 .. 18:56: one MISSED
        clock.t = ny(2026, 11, 24, 18, 1 + minute)
        a.run()
    assert a.alerts() == ["NOT_DROPPED daily 2026-11-24", "MISSED daily 2026-11-24"]
    clock.t = ny(2026, 11, 24, 19, 1)  # realert_seconds later: again
    a.run()
    clock.t = ny(2026, 11, 24, 19, 30)
    a.run()
    assert a.alerts().count("MISSED daily 2026-11-24") == 2
    rec = a.store.calendar_alerts("daily", ny(2026, 11, 24, 18))["MISSED"]
    assert (rec.sent_count, rec.first_sent_at, rec.last_sent_at) == (2, ny(2026, 11, 24, 18, 1),
                                                                     ny(2026, 11, 24, 19, 1))
    # The period ends at the next midnight: the occurrence closes, the alert stops.
    clock.t = ny(2026, 11, 25, 0, 5)
    a.run()
    clock.t = ny(2026, 11, 25, 3, 5)
    a.run()
    assert a.alerts().count("MISSED daily 2026-11-24") == 2
    assert a.occ("2026-11-24").closed and a.occ("2026-11-25").state == "EXPECTED"
    sample = a.metrics.registry.get_sample_value
    assert sample("filex_calendar_occurrences", {"expectation": "daily", "state": "EXPECTED"}) == 1
    assert sample("filex_calendar_occurrences", {"expectation": "daily", "state": "MISSED"}) == 0


def test_restart_in_the_middle_changes_nothing(agent_factory):
    clock = Clock(ny(2026, 11, 24, 17, 10))
    cfg = make_config(DAILY)
    a = agent_factory(cfg, clock)
    a.run()
    assert a.alerts() == ["NOT_DROPPED daily 2026-11-24"]
    a.close()
    # A new process: new notifier (no memory of what it sent), same journal.
    clock.t = ny(2026, 11, 24, 17, 20)
    b = agent_factory(cfg, clock)
    b.run()
    assert b.alerts() == ["NOT_DROPPED daily 2026-11-24"]
    assert b.occ("2026-11-24").state == "EXPECTED"
    clock.t = ny(2026, 11, 24, 18, 5)
    b.run()
    b.close()
    c = agent_factory(cfg, clock)
    clock.t = ny(2026, 11, 24, 18, 20)
    c.run()
    assert c.alerts() == ["NOT_DROPPED daily 2026-11-24", "MISSED daily 2026-11-24"]
    c.close()
    # Down from Tuesday night to Thursday 10:00: Wednesday's whole period went by unseen. It is
    # caught up on restart, MISSED and alerted once even though it closes at once.
    d = agent_factory(cfg, clock)
    clock.t = ny(2026, 11, 26, 10)
    d.run()
    d.run()
    wed = d.occ("2026-11-25")
    assert (wed.state, wed.closed) == ("MISSED", True)
    assert d.alerts().count("MISSED daily 2026-11-25") == 1
    # Thursday is a holiday; Friday's period began at Thursday 00:00 (files may come early).
    assert [(o.label, o.state) for o in d.store.occurrences()] == [
        ("2026-11-24", "MISSED"), ("2026-11-25", "MISSED"), ("2026-11-27", "EXPECTED")]


def test_a_file_counts_once_when_periods_overlap(agent_factory):
    """30 business days after a month's end is after the next month has ended: one file must
    not satisfy both months."""
    clock = Clock(ny(2026, 5, 1, 9))
    exp = {"name": "monthly", "route": "r1", "pattern": "M_*", "recurrence": "month_end",
           "business_days_after": 30, "due": "17:00"}
    a = agent_factory(make_config(exp), clock)
    a.run()  # first seen: March (due 13 May) and April (due 12 June) are both under way
    assert [o.label for o in a.store.occurrences()] == ["2026-03", "2026-04"]
    assert a.occ("2026-03").deadline == ny(2026, 5, 13, 17)
    clock.t = ny(2026, 6, 2, 9)
    a.run()
    assert [o.label for o in a.store.occurrences()] == ["2026-03", "2026-04", "2026-05"]
    assert a.occ("2026-03").state == "MISSED"
    sub = a.drop("M_april.csv", ny(2026, 6, 2, 10))
    a.uploaded(sub, ny(2026, 6, 2, 10, 1))
    a.verdict(sub, State.ACCEPTED, ny(2026, 6, 2, 11))
    clock.t = ny(2026, 6, 2, 12)
    a.run()
    assert a.occ("2026-04").state == "ACCEPTED" and a.occ("2026-05").state == "EXPECTED"


# -- submission windows ------------------------------------------------------------------------

WINDOW = {"days": "weekdays", "start": "06:00", "end": "20:00",
          "blackouts": [{"start": datetime(2026, 12, 14, 5, 0), "end": datetime(2026, 12, 14, 9, 0),
                         "reason": "FINRA maintenance"}]}


def test_window_allows():
    route = make_config(window=WINDOW).routes[0]
    assert window_allows(route, ny(2026, 12, 15, 12)) == (True, None, None)
    ok, nxt, why = window_allows(route, ny(2026, 12, 15, 21))  # Tuesday evening
    assert (ok, nxt) == (False, ny(2026, 12, 16, 6)) and "outside the submission window" in why
    ok, nxt, _ = window_allows(route, ny(2026, 12, 12, 10))  # Saturday: Monday, after the maintenance
    assert (ok, nxt) == (False, ny(2026, 12, 14, 9))
    ok, nxt, why = window_allows(route, ny(2026, 12, 14, 7))
    assert (ok, nxt) == (False, ny(2026, 12, 14, 9)) and why.startswith("FINRA maintenance until")
    # Across the spring DST change: 06:00 local is 11:00 UTC before, 10:00 UTC after.
    assert window_allows(route, ny(2026, 3, 6, 21))[1] == datetime(2026, 3, 9, 10, tzinfo=UTC)
    business = make_config(window={**WINDOW, "days": "business_days"}).routes[0]
    assert window_allows(business, ny(2026, 11, 25, 21))[1] == ny(2026, 11, 27, 6)  # not Thanksgiving
    assert window_allows(make_config().routes[0], ny(2026, 12, 12, 3)) == (True, None, None)


def test_hold_for_window_keeps_the_file_queued_until_it_opens(tmp_path):
    cfg = make_config(window=WINDOW)
    store = SQLiteStore(tmp_path / "j.sqlite3")
    try:
        sub = store.create(route="r1", org="0001", application="app1", transport="rest", file_name="a.csv",
                           source_path="/o/a.csv", local_path="/s/a.csv", state=State.QUEUED)
        saturday = ny(2026, 12, 12, 10)
        assert hold_for_window(cfg, store, sub.id, saturday) is True
        held = store.get(sub.id)
        assert held.state is State.QUEUED and held.next_attempt_at == ny(2026, 12, 14, 9)
        assert held.reason.startswith("waiting for the submission window: outside the submission window")
        assert "goes out at 2026-12-14 09:00 EST" in held.reason
        assert store.due(saturday, 10) == [] and store.due(ny(2026, 12, 14, 9), 10) == [sub.id]
        assert hold_for_window(cfg, store, sub.id, ny(2026, 12, 14, 9)) is False
        assert store.get(sub.id).reason is None
    finally:
        store.close()


# -- configuration -----------------------------------------------------------------------------

@pytest.mark.parametrize("change,key,words", [
    ({"recurrence": "weekly"}, "expectations[0].recurrence", ""),
    ({"calendar": "MOON"}, "expectations[0].calendar", "unknown exchange calendar"),
    ({"timezone": "Mars/Olympus"}, "expectations[0].timezone", "unknown time zone"),
    ({"due": "6pm"}, "expectations[0].due", "hh:mm"),
    ({"due": None}, "expectations[0].due", "required"),
    ({"recurrence": "cron", "due": None, "cron": "61 * * * *"}, "expectations[0].cron", "cron"),
    ({"recurrence": "cron", "due": None, "cron": "0 18 * *"}, "expectations[0].cron", "5 fields"),
    ({"recurrence": "cron"}, "expectations[0].cron", "required"),
    ({"recurrence": "cron", "due": None, "cron": "0 9 1 * mon"}, "expectations[0].cron", "not both"),
    ({"recurrence": "cron", "due": None, "cron": "0 9 * * 8"}, "expectations[0].cron", "day of week"),
    ({"recurrence": "quarter_end"}, "expectations[0].business_days_after", "required"),
    ({"business_days_after": 3}, "expectations[0].business_days_after", "only with"),
    ({"recurrence": "days_of_month"}, "expectations[0].days", "required"),
    ({"recurrence": "days_of_month", "days": [0]}, "expectations[0].days", "day of the month"),
    ({"roll": "nearest"}, "expectations[0].roll", ""),
    ({"route": "nope"}, "expectations[0].route", "no route named"),
    ({"warn_before_minutes": -5}, "expectations[0].warn_before_minutes", ""),
    ({"surprise": 1}, "expectations[0].surprise", "unknown key"),
])
def test_bad_expectation_names_the_key(change, key, words):
    exp = {k: v for k, v in {**DAILY, **change}.items() if v is not None}
    with pytest.raises(ConfigError) as e:
        make_config(exp)
    assert e.value.key == key
    assert words.lower() in str(e.value).lower()


def test_duplicate_expectation_names():
    with pytest.raises(ConfigError) as e:
        make_config(DAILY, DAILY)
    assert e.value.key == "expectations[1].name"


@pytest.mark.parametrize("change,key", [
    ({"start": "20:00", "end": "06:00"}, "routes[0].submission_window"),
    ({"end": "25:00"}, "routes[0].submission_window.end"),
    ({"timezone": "Nowhere/Else"}, "routes[0].submission_window.timezone"),
    ({"calendar": "XXXX"}, "routes[0].submission_window.calendar"),
    ({"days": "sundays"}, "routes[0].submission_window.days"),
    ({"blackouts": [{"start": datetime(2026, 1, 2), "end": datetime(2026, 1, 1)}]},
     "routes[0].submission_window.blackouts[0]"),
])
def test_bad_submission_window_names_the_key(change, key):
    with pytest.raises(ConfigError) as e:
        make_config(window={**WINDOW, **change})
    assert e.value.key == key


def _config_file(tmp_path: Path, expectation: str) -> Path:
    """A config file with one route and the given [[expectations]] table."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'''
[agent]
data_dir = "{tmp_path}"
[credentials.main]
client_id = "acme"
client_secret = "env:FILEX_SECRET"
[[routes]]
name = "r1"
outbox = "{tmp_path / 'out'}"
org = "0001"
application = "app1"
credential = "main"
[[expectations]]
{expectation}
''')
    return cfg


def test_cli_bad_calendar_exits_2_naming_the_key(tmp_path):
    import subprocess
    import sys

    from filex_agent.cli import main

    cfg = _config_file(tmp_path, 'name = "daily"\nroute = "r1"\npattern = "T_*"\nrecurrence = "business_day"\n'
                                 'due = "18:00"\ncalendar = "NYSEE"')
    proc = subprocess.run([sys.executable, "-m", "filex_agent", "calendar", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "expectations[0].calendar" in proc.stderr and "NYSEE" in proc.stderr
    cfg.write_text(cfg.read_text().replace('"NYSEE"', '"NYSE"'))
    assert main(["calendar", "--config", str(cfg), "--json", "--from", "2026-11-24", "--to", "2026-11-28"]) == 0


def test_calendar_command_lists_coming_occurrences(tmp_path, capsys):
    from filex_agent.cli import main

    cfg = _config_file(tmp_path, 'name = "focus"\nroute = "r1"\npattern = "FOCUS_*"\nrecurrence = "quarter_end"\n'
                                 'business_days_after = 17\ndue = "17:00"')
    assert main(["calendar", "--config", str(cfg), "--json", "--from", "2030-01-01", "--to", "2031-01-01"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["period"], r["deadline_local"], r["state"]) for r in rows] == [
        ("2029-Q4", "2030-01-25 17:00 EST", "EXPECTED"), ("2030-Q1", "2030-04-24 17:00 EDT", "EXPECTED"),
        ("2030-Q2", "2030-07-24 17:00 EDT", "EXPECTED"), ("2030-Q3", "2030-10-23 17:00 EDT", "EXPECTED")]
    assert main(["calendar", "--config", str(cfg), "--from", "2030-02-01", "--to", "2030-01-01"]) == 2
