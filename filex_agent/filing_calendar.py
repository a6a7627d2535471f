"""The filing calendar: what *should* have been filed, and alerts before a deadline is missed.

An ``[[expectations]]`` entry says which files (a glob on the name, on one route) are due when.
Each due filing is an *occurrence* with a deadline and a period: a matching file claimed in
[``opens_at``, ``closes_at``) counts for it. The journal keeps every occurrence's state (so a
restart changes nothing) and when each alert was sent (so a restart does not re-send one).

Business days come from the ``holidays`` package's financial calendars (NYSE by default:
holidays, special closings and 1 pm early closes); local times use zoneinfo, so DST is handled.

Named ``filing_calendar`` so that it never shadows the standard library's ``calendar``.
"""

from __future__ import annotations

import calendar as std_calendar
import fnmatch
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from filex_agent.config import ExpectationSettings, RouteSettings, SubmissionWindowSettings, cron_trigger, parse_hhmm
from filex_agent.store import CalendarAlert, Occurrence, State, Store, Submission, utcnow

if TYPE_CHECKING:
    from filex_agent.config import Config
    from filex_agent.metrics import Metrics
    from filex_agent.notify import Notifier

log = logging.getLogger(__name__)

# Occurrence states.
EXPECTED, DROPPED, SUBMITTED, ACCEPTED, MISSED = "EXPECTED", "DROPPED", "SUBMITTED", "ACCEPTED", "MISSED"
REJECTED, PARTIALLY_REJECTED = "REJECTED", "PARTIALLY_REJECTED"
OCCURRENCE_STATES = (EXPECTED, DROPPED, SUBMITTED, ACCEPTED, REJECTED, PARTIALLY_REJECTED, MISSED)
ALERT_KINDS = ("NOT_DROPPED", "AT_RISK", "REJECTED_BEFORE_DUE", "MISSED")
# A FAILED file never reaches FINRA and a HELD one waits for a person: neither is on its way.
_NOT_ON_ITS_WAY = frozenset({State.FAILED, State.HELD})
_REJECTED = frozenset({State.REJECTED, State.PARTIALLY_REJECTED})
WINDOW_REASON = "waiting for the submission window"


# -- business days -----------------------------------------------------------------------------

class BusinessCalendar:
    """Business days and early closes of one exchange calendar (thread-safe; years load lazily)."""

    def __init__(self, name: str):
        import holidays

        self.name = name
        self._closed = holidays.financial_holidays(name)
        self._half: Any = None
        try:
            self._half = holidays.financial_holidays(name, categories=("half_day",))
        except ValueError:  # this calendar has no early-close data in `holidays`
            pass
        self._lock = threading.Lock()  # a holidays object fills in a year on first lookup

    def is_business_day(self, d: date) -> bool:
        if d.weekday() >= 5:
            return False
        with self._lock:
            return d not in self._closed

    def early_close(self, d: date) -> str | None:
        """The early close's name ("... (markets close at 1:00pm)") on a business day, else None."""
        if self._half is None:
            return None
        with self._lock:  # `in` loads the year; `get` alone would not
            return self._half.get(d) if d in self._half else None

    def add_business_days(self, d: date, n: int) -> date:
        while n > 0:
            d += timedelta(days=1)
            if self.is_business_day(d):
                n -= 1
        return d

    def roll(self, d: date, direction: str) -> date:
        step = timedelta(days=-1 if direction == "previous" else 1)
        while not self.is_business_day(d):
            d += step
        return d


@lru_cache(maxsize=None)
def business_calendar(name: str) -> BusinessCalendar:
    return BusinessCalendar(name)


def local_instant(d: date, t: time | None, tz: ZoneInfo) -> datetime:
    """``d`` at local time ``t`` (None: the next midnight) as a UTC instant.

    A local time skipped by a DST change (02:30 on the spring-forward day) is taken with the
    offset before the change, so it lands after the gap (03:30 EDT); a repeated one (01:30 on
    the autumn day) is its first occurrence (EDT), the earlier instant, the safer deadline.
    """
    if t is None:
        d, t = d + timedelta(days=1), time(0, 0)
    return datetime.combine(d, t, tzinfo=tz).astimezone(timezone.utc)


# -- schedules ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Slot:
    """One computed occurrence of an expectation (not yet in the journal)."""

    deadline: datetime  # UTC
    opens_at: datetime
    closes_at: datetime
    label: str
    early_close: bool = False


@dataclass(frozen=True)
class _Raw:
    deadline: datetime
    label: str
    early_close: bool = False
    opens_at: datetime | None = None  # fixed by the period (month/quarter end); else from the previous


class Schedule:
    """The deadlines of one expectation, in order, with their periods."""

    MAX_SLOTS = 10_000  # a minute-by-minute cron over a long range is a mistake, not a plan

    def __init__(self, exp: ExpectationSettings):
        self.exp = exp
        self.tz = ZoneInfo(exp.timezone)
        self.cal = business_calendar(exp.calendar)
        self.due = parse_hhmm(exp.due) if exp.due else None
        self.early_due = parse_hhmm(exp.early_close_due) if exp.early_close_due else None

    # The earliest deadline looked at before ``start``: far enough back to have a previous one.
    def _lookback(self) -> timedelta:
        return {"business_day": timedelta(days=12), "calendar_day": timedelta(days=2),
                "days_of_month": timedelta(days=65), "cron": timedelta(days=1)}.get(self.exp.recurrence,
                                                                                    timedelta(days=400))

    def _deadline(self, d: date) -> tuple[datetime, bool]:
        early = self.early_due is not None and self.cal.early_close(d) is not None
        return local_instant(d, self.early_due if early else self.due, self.tz), early

    def _raw(self, start: datetime) -> Iterator[_Raw]:
        """Deadlines from about ``start`` on, in increasing order, forever."""
        e = self.exp
        first = start.astimezone(self.tz).date()
        if e.recurrence in ("business_day", "calendar_day"):
            d = first
            while True:
                if e.recurrence == "calendar_day" or self.cal.is_business_day(d):
                    deadline, early = self._deadline(d)
                    yield _Raw(deadline, d.isoformat(), early)
                d += timedelta(days=1)
        elif e.recurrence in ("month_end", "quarter_end"):
            y, m = first.year, first.month
            while True:
                if e.recurrence == "month_end" or m % 3 == 0:
                    end = date(y, m, std_calendar.monthrange(y, m)[1])
                    deadline, early = self._deadline(self.cal.add_business_days(end, e.business_days_after or 1))
                    label = f"{y}-{m:02d}" if e.recurrence == "month_end" else f"{y}-Q{m // 3}"
                    yield _Raw(deadline, label, early, opens_at=local_instant(end, None, self.tz))
                y, m = (y + 1, 1) if m == 12 else (y, m + 1)
        elif e.recurrence == "days_of_month":
            y, m = first.year, first.month
            while True:
                last = std_calendar.monthrange(y, m)[1]
                dates: dict[date, date] = {}
                for n in e.days:
                    nominal = date(y, m, last if n == -1 else min(n, last))
                    dates.setdefault(self.cal.roll(nominal, e.roll), nominal)
                for d in sorted(dates):
                    deadline, early = self._deadline(d)
                    yield _Raw(deadline, dates[d].isoformat(), early)
                y, m = (y + 1, 1) if m == 12 else (y, m + 1)
        else:  # cron: each fire time is a deadline
            trigger = cron_trigger(e.cron or "", e.timezone)
            prev, cur = None, start.astimezone(self.tz)
            while True:
                nxt = trigger.get_next_fire_time(prev, cur)
                if nxt is None:
                    return
                yield _Raw(nxt.astimezone(timezone.utc), nxt.strftime("%Y-%m-%d %H:%M"))
                prev, cur = nxt, nxt + timedelta(seconds=1)

    def _opens(self, raw: _Raw, prev: _Raw | None) -> datetime:
        """Where a period starts: after the month/quarter it reports on; otherwise at the
        midnight after the previous deadline's day (a file dropped after a deadline on the same
        day is that occurrence's late file), or at the previous deadline when both fall on
        one day (an intraday cron)."""
        if raw.opens_at is not None:
            return raw.opens_at
        if prev is None:
            return local_instant(raw.deadline.astimezone(self.tz).date(), time(0, 0), self.tz)
        midnight = local_instant(prev.deadline.astimezone(self.tz).date(), None, self.tz)
        return midnight if midnight <= raw.deadline else prev.deadline

    def iter_slots(self, start: datetime) -> Iterator[Slot]:
        """Occurrences whose deadline is after ``start``, each with its period, in order."""
        prev: _Raw | None = None
        pending: tuple[_Raw, datetime] | None = None  # a slot waiting for the next one's opening
        for raw in self._raw(start - self._lookback()):
            if prev is not None and raw.deadline <= prev.deadline:
                continue  # two fixed days rolled onto one business day (the 1st and the 31st): one deadline
            opens = self._opens(raw, prev)
            if pending is not None:
                p, p_opens = pending
                yield Slot(p.deadline, p_opens, max(opens, p.deadline), p.label, p.early_close)
            pending = (raw, opens) if raw.deadline > start else None
            prev = raw
        if pending is not None:  # a schedule that ends (a cron for one date): a day of grace
            p, p_opens = pending
            yield Slot(p.deadline, p_opens, p.deadline + timedelta(days=1), p.label, p.early_close)

    def slots(self, start: datetime, end: datetime) -> list[Slot]:
        """Occurrences whose deadline is in (start, end]."""
        out: list[Slot] = []
        for slot in self.iter_slots(start):
            if slot.deadline > end:
                break
            if len(out) >= self.MAX_SLOTS:
                log.warning("expectation %s: more than %d occurrences asked for; list cut", self.exp.name,
                            self.MAX_SLOTS)
                break
            out.append(slot)
        return out

    def opened(self, after: datetime, now: datetime) -> list[Slot]:
        """Occurrences with a deadline after ``after`` whose period has begun by ``now``."""
        out: list[Slot] = []
        for slot in self.iter_slots(after):
            if slot.opens_at > now or len(out) >= self.MAX_SLOTS:
                break
            out.append(slot)
        return out

    def current(self, now: datetime) -> list[Slot]:
        """The occurrences whose period holds ``now`` (more than one when periods overlap: a
        quarter's report is still late-fileable when the next daily one opens)."""
        back = self._lookback() if self.exp.recurrence != "cron" else timedelta(days=2)
        return [s for s in self.slots(now - back, now + back) if s.opens_at <= now < s.closes_at]

    def next_deadline(self, now: datetime) -> datetime | None:
        return next((r.deadline for r in self._raw(now - timedelta(days=1)) if r.deadline > now), None)


# -- assessing an occurrence -------------------------------------------------------------------

def matching(subs: list[Submission], pattern: str) -> list[Submission]:
    return [s for s in subs if fnmatch.fnmatchcase(s.file_name, pattern)]


def assess(deadline: datetime, subs: list[Submission], now: datetime) -> tuple[str, Submission | None, bool | None]:
    """(state, the submission it rests on, on time) of one occurrence from its matching files.

    - ACCEPTED as soon as one matching file is accepted; on time if it was uploaded by the
      deadline, late otherwise (a late file still satisfies the occurrence).
    - Before the deadline: SUBMITTED (uploaded, no verdict yet) over DROPPED (claimed, not yet
      uploaded) over the latest file's REJECTED / PARTIALLY_REJECTED (a corrected file is still
      needed), else EXPECTED.
    - After the deadline: SUBMITTED while a file uploaded by the deadline awaits its verdict;
      otherwise MISSED, whatever came late and is still on its way (it makes the occurrence
      ACCEPTED late if FINRA accepts it).

    FAILED and HELD files do not count: neither is on its way to FINRA.
    """
    live = [s for s in subs if s.state not in _NOT_ON_ITS_WAY]
    accepted = [s for s in live if s.state is State.ACCEPTED]
    if accepted:
        first = min(accepted, key=lambda s: (s.uploaded_at or s.final_at or s.updated_at))
        sent = first.uploaded_at or first.final_at or first.updated_at
        return ACCEPTED, first, sent <= deadline
    pending = [s for s in live if s.state not in _REJECTED]
    uploaded = [s for s in pending if s.uploaded_at is not None]
    if now <= deadline:
        if uploaded:
            return SUBMITTED, uploaded[-1], None
        if pending:
            return DROPPED, pending[-1], None
        if live:
            return live[-1].state.value, live[-1], None
        return EXPECTED, None, None
    in_time = [s for s in uploaded if s.uploaded_at is not None and s.uploaded_at <= deadline]
    if in_time:
        return SUBMITTED, in_time[-1], None
    return MISSED, (live[-1] if live else None), None


# -- the watcher that runs it ------------------------------------------------------------------

class CalendarWatch:
    """Evaluates every expectation (``run()``, each minute from the service): new occurrences
    into the journal, states from the matching submissions, alerts, metrics.

    Alert kinds, each about one occurrence, sent once and re-sent after ``notify.realert_seconds``
    while the problem lasts (the journal remembers when, so a restart re-sends nothing early):
    NOT_DROPPED (no matching file ``warn_before_minutes`` before the deadline), AT_RISK (a file
    dropped or submitted but no verdict by then), REJECTED_BEFORE_DUE (the latest file was
    rejected and the deadline is still ahead), MISSED (the deadline passed: see ``assess``;
    re-sent until a late file is accepted or the period ends).
    """

    def __init__(self, config: "Config", store: Store, notifier: "Notifier | None" = None,
                 metrics: "Metrics | None" = None, clock: Callable[[], datetime] = utcnow,
                 on_change: Callable[[Occurrence, str | None], None] | None = None):
        self.config = config
        self.on_change = on_change  # (occurrence, previous state or None when new): the audit trail
        self.store = store
        self.notifier = notifier
        self.metrics = metrics
        self.clock = clock
        self._lock = threading.Lock()  # one evaluation at a time (service tick, tests, reload)
        self._gauge_keys: set[tuple[str, str]] = set()
        self._deadline_keys: set[str] = set()

    def run(self) -> list[Occurrence]:
        """Evaluate every expectation now; returns the occurrences still open afterwards."""
        with self._lock:
            now = self.clock()
            result: list[Occurrence] = []
            for exp in self.config.expectations:
                try:
                    result += self._evaluate(exp, now)
                except Exception:  # noqa: BLE001 - one bad expectation must not hide the others
                    log.exception("filing calendar: evaluating %s failed", exp.name)
            self._update_metrics(now)
            return result

    # -- one expectation ----------------------------------------------------------------------
    def _evaluate(self, exp: ExpectationSettings, now: datetime) -> list[Occurrence]:
        sched = Schedule(exp)
        self._open_new(exp, sched, now)
        out = []
        open_ = self.store.occurrences(expectation=exp.name, open_only=True)
        if not open_:
            return out
        # Periods can overlap (a report due more business days after its month than the month
        # has): a file that satisfied one occurrence does not also count for a later one.
        earlier = self.store.occurrences(expectation=exp.name, since=open_[0].opens_at - timedelta(days=400),
                                         until=open_[-1].deadline)
        taken = {o.submission_id: o.deadline for o in earlier if o.state == ACCEPTED and o.submission_id}
        for occ in open_:
            occ = self._update(exp, occ, now, {i for i, d in taken.items() if d < occ.deadline})
            if occ.state == ACCEPTED and occ.submission_id:
                taken[occ.submission_id] = occ.deadline
            if not occ.closed:
                out.append(occ)
        return out

    def _open_new(self, exp: ExpectationSettings, sched: Schedule, now: datetime) -> None:
        """Journal the occurrences whose period has begun. The first time an expectation is
        seen, tracking starts with the periods under way whose deadline is still ahead; after
        that every occurrence after the last one journaled is added (a stopped agent catches up
        on restart, and the ones it slept through become MISSED if nothing came)."""
        last = self.store.last_occurrence(exp.name)
        if last is None:
            new = [s for s in sched.current(now) if s.deadline >= now]
        else:
            new = sched.opened(last.deadline, now)
        for s in new:
            occ = Occurrence(expectation=exp.name, deadline=s.deadline, opens_at=s.opens_at, closes_at=s.closes_at,
                             route=exp.route, pattern=exp.pattern, label=s.label, state=EXPECTED,
                             early_close=s.early_close, updated_at=now)
            self.store.save_occurrence(occ)
            log.info("filing calendar: %s %s due %s", exp.name, s.label, _local(s.deadline, exp))
            self._changed(occ, None)

    def _changed(self, occ: Occurrence, previous: str | None) -> None:
        if self.on_change is not None:
            try:
                self.on_change(occ, previous)
            except Exception:  # noqa: BLE001 - an observer never stops the evaluation
                log.exception("filing calendar: change observer failed")

    def _update(self, exp: ExpectationSettings, occ: Occurrence, now: datetime, taken: set[int]) -> Occurrence:
        subs = [s for s in matching(self.store.list_created(occ.route, occ.opens_at, occ.closes_at), occ.pattern)
                if s.id not in taken]
        state, sub, on_time = assess(occ.deadline, subs, now)
        pending = any(not s.is_final and s.state is not State.HELD for s in subs)
        closed = state == ACCEPTED or (now >= occ.closes_at and not pending)
        new = Occurrence(**{**occ.__dict__, "state": state, "on_time": on_time,
                            "submission_id": sub.id if sub else None, "verdict": sub.state.value if sub else None,
                            "closed": closed})
        if (new.state, new.on_time, new.submission_id, new.verdict, new.closed) != \
                (occ.state, occ.on_time, occ.submission_id, occ.verdict, occ.closed):
            new.updated_at = now
            self.store.save_occurrence(new)
            if new.state != occ.state:
                log.info("filing calendar: %s %s %s -> %s%s", exp.name, occ.label, occ.state, new.state,
                         f" (submission {new.submission_id})" if new.submission_id else "")
                self._changed(new, occ.state)
        self._alerts(exp, new, sub, now)
        return new

    # -- alerts -------------------------------------------------------------------------------
    def _problems(self, exp: ExpectationSettings, occ: Occurrence, sub: Submission | None, now: datetime,
                  recorded: dict[str, CalendarAlert]) -> dict[str, tuple[str, str]]:
        """Alert kind -> (subject, text) of every problem this occurrence has now. A closed
        occurrence has none, except a MISSED one never alerted yet (the agent was down through
        its whole period): a missed filing is never silent."""
        out: dict[str, tuple[str, str]] = {}
        due = _local(occ.deadline, exp)
        warn_from = occ.deadline - timedelta(minutes=exp.warn_before_minutes)
        what = f"{exp.name} ({occ.label}: files matching {exp.pattern!r} on route {exp.route})"
        if occ.closed and not (occ.state == MISSED and "MISSED" not in recorded):
            return out
        if now <= occ.deadline:
            left = _duration(occ.deadline - now)
            if occ.state == EXPECTED and now >= warn_from:
                out["NOT_DROPPED"] = (f"{exp.name} {occ.label}: no file yet, due {due}",
                                      f"No file for {what} has been dropped, and it is due {due} (in {left}).\n"
                                      f"Drop it into the outbox of route {exp.route}.")
            elif occ.state in (DROPPED, SUBMITTED) and now >= warn_from:
                step = ("is waiting to be uploaded" + (f" ({sub.reason})" if sub and sub.reason else "")
                        if occ.state == DROPPED else "was submitted but FINRA has not given a verdict yet")
                out["AT_RISK"] = (f"{exp.name} {occ.label}: no verdict yet, due {due}",
                                  f"{sub.file_name if sub else 'The file'} for {what} {step}; due {due} (in {left}).")
            elif occ.state in (REJECTED, PARTIALLY_REJECTED):
                fix = ("correct it and resubmit the whole file" if occ.state == REJECTED
                       else "submit a new file with only the corrected data")
                out["REJECTED_BEFORE_DUE"] = (
                    f"{exp.name} {occ.label}: {occ.state.lower().replace('_', ' ')}, due {due}",
                    f"FINRA {occ.state.lower().replace('_', ' ')} {sub.file_name if sub else 'the file'} for {what}: "
                    f"{fix} before {due} (in {left}); see its feedback (`filex-agent status`).")
        elif occ.state == MISSED:
            late = (f" A later file, {sub.file_name}, is {sub.state.value}; if FINRA accepts it the filing "
                    "counts as late." if sub and not sub.is_final else "")
            out["MISSED"] = (f"{exp.name} {occ.label}: deadline {due} missed",
                             f"The deadline {due} for {what} passed with nothing accepted or submitted in time "
                             f"({_duration(now - occ.deadline)} ago).{late}\nFile it now and tell compliance.")
        return out

    def _alerts(self, exp: ExpectationSettings, occ: Occurrence, sub: Submission | None, now: datetime) -> None:
        recorded = self.store.calendar_alerts(occ.expectation, occ.deadline)
        problems = self._problems(exp, occ, sub, now, recorded)
        realert = timedelta(seconds=self.config.notify.realert_seconds)
        for kind, (subject, text) in problems.items():
            rec: CalendarAlert | None = recorded.get(kind)
            if rec is not None and rec.cleared_at is None and now - rec.last_sent_at < realert:
                continue
            if self._send(kind, subject, text, occ, sub):
                self.store.record_calendar_alert(occ.expectation, occ.deadline, kind, now)
        for kind, rec in recorded.items():
            if kind not in problems and rec.cleared_at is None:
                self.store.clear_calendar_alert(occ.expectation, occ.deadline, kind, now)
                if self.notifier is not None:
                    self.notifier.resolve(_key(kind, occ))
                log.info("filing calendar: %s %s: %s cleared (%s)", occ.expectation, occ.label, kind, occ.state)

    def _send(self, kind: str, subject: str, text: str, occ: Occurrence, sub: Submission | None) -> bool:
        """True when the alert went out (queued for a channel, or logged when there is none)."""
        from filex_agent.notify import Notification

        n = Notification(kind=kind, subject=subject, text=text, submission_id=sub.id if sub else None,
                         file=sub.file_name if sub else None, route=occ.route)
        if self.notifier is None:
            log.warning("ALERT %s: %s", kind, subject)
            return True
        queued = self.notifier.notify(n, _key(kind, occ))
        return queued or not self.notifier.has_channels

    # -- metrics ------------------------------------------------------------------------------
    def _update_metrics(self, now: datetime) -> None:
        if self.metrics is None:
            return
        counts: dict[tuple[str, str], int] = {}
        names = [e.name for e in self.config.expectations]
        for e in names:
            for st in OCCURRENCE_STATES:
                counts[(e, st)] = 0
        # Open occurrences, and those whose period is still under way (today's ACCEPTED).
        for occ in self.store.occurrences(since=now - timedelta(days=400)):
            if occ.expectation in names and (not occ.closed or occ.opens_at <= now < occ.closes_at):
                counts[(occ.expectation, occ.state)] += 1
        for key in self._gauge_keys - set(counts):
            try:
                self.metrics.calendar_occurrences.remove(*key)
            except KeyError:
                pass
        for (e, st), n in counts.items():
            self.metrics.calendar_occurrences.labels(e, st).set(n)
        self._gauge_keys = set(counts)
        for e in self._deadline_keys - set(names):
            try:
                self.metrics.calendar_next_deadline.remove(e)
            except KeyError:
                pass
        for exp in self.config.expectations:
            nxt = Schedule(exp).next_deadline(now)
            if nxt is not None:
                self.metrics.calendar_next_deadline.labels(exp.name).set(nxt.timestamp())
        self._deadline_keys = set(names)


def _key(kind: str, occ: Occurrence) -> str:
    return f"{kind}:{occ.expectation}:{occ.deadline.astimezone(timezone.utc).isoformat()}"


def _local(when: datetime, exp: ExpectationSettings) -> str:
    return when.astimezone(ZoneInfo(exp.timezone)).strftime("%Y-%m-%d %H:%M %Z")


def _duration(delta: timedelta) -> str:
    minutes = int(delta.total_seconds() // 60)
    if minutes < 120:
        return f"{minutes} min"
    hours = minutes / 60
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


# -- the calendar command ----------------------------------------------------------------------

def calendar_rows(config: "Config", store: Store, since: datetime, until: datetime,
                  now: datetime | None = None) -> list[dict[str, Any]]:
    """Past occurrences from the journal, coming ones computed, for `filex-agent calendar`."""
    now = now or utcnow()
    rows: list[dict[str, Any]] = []
    exps = {e.name: e for e in config.expectations}
    known: set[tuple[str, datetime]] = set()
    for occ in store.occurrences(since=since, until=until):
        known.add((occ.expectation, occ.deadline))
        exp = exps.get(occ.expectation)
        sub = _sub(store, occ.submission_id)
        rows.append(_row(occ.expectation, occ.label, occ.deadline, exp, occ.state, occ.on_time, occ.route,
                         occ.pattern, sub, occ.early_close, journaled=True))
    for exp in config.expectations:
        last = store.last_occurrence(exp.name)
        for s in Schedule(exp).slots(max(since, now) - timedelta(microseconds=1), until):
            if (exp.name, s.deadline) in known or (last is not None and s.deadline <= last.deadline):
                continue
            if s.deadline < until:
                rows.append(_row(exp.name, s.label, s.deadline, exp, EXPECTED, None, exp.route, exp.pattern,
                                 None, s.early_close, journaled=False))
    rows.sort(key=lambda r: (r["deadline"], r["expectation"]))
    return rows


def _sub(store: Store, sub_id: int | None) -> Submission | None:
    if sub_id is None:
        return None
    try:
        return store.get(sub_id)
    except KeyError:
        return None


def _row(name: str, label: str, deadline: datetime, exp: ExpectationSettings | None, state: str,
         on_time: bool | None, route: str, pattern: str, sub: Submission | None, early: bool,
         journaled: bool) -> dict[str, Any]:
    tz = ZoneInfo(exp.timezone) if exp else timezone.utc
    state_text = state + ("" if on_time is None else (" (on time)" if on_time else " (late)"))
    local = deadline.astimezone(tz)
    # day and time_local: the status page's calendar grid files each occurrence under its local day.
    time_local = local.strftime("%H:%M %Z") + (" early close" if early else "")
    return {
        "expectation": name, "period": label, "deadline": deadline.astimezone(timezone.utc).isoformat(),
        "deadline_local": f"{local.date().isoformat()} {time_local}", "day": local.date().isoformat(),
        "time_local": time_local,
        "state": state, "on_time": on_time, "status": state_text, "route": route, "pattern": pattern,
        "submission_id": sub.id if sub else None, "file": sub.file_name if sub else None,
        "verdict": sub.state.value if sub else None, "journaled": journaled,
    }


# -- submission windows ------------------------------------------------------------------------

def _window_day_ok(w: SubmissionWindowSettings, d: date) -> bool:
    if w.days == "every_day":
        return True
    if w.days == "weekdays":
        return d.weekday() < 5
    return business_calendar(w.calendar).is_business_day(d)


def _blackouts(w: SubmissionWindowSettings, tz: ZoneInfo) -> list[tuple[datetime, datetime, str]]:
    def utc(t: datetime) -> datetime:
        return (t if t.tzinfo else t.replace(tzinfo=tz)).astimezone(timezone.utc)

    return [(utc(b.start), utc(b.end), b.reason) for b in w.blackouts]


def window_allows(route: RouteSettings, now: datetime) -> tuple[bool, datetime | None, str | None]:
    """(may a file be sent on ``route`` at ``now``, when the window next opens, why not).

    A pure function of the route's ``submission_window`` and ``now``: no window means always.
    """
    w = route.submission_window
    if w is None:
        return True, None, None
    tz = ZoneInfo(w.timezone)
    start, end = parse_hhmm(w.start), parse_hhmm(w.end, allow_24=True)
    blackouts = _blackouts(w, tz)
    t, why = now, None
    for _ in range(1000):  # each turn moves t forward to a window start or a blackout end
        inside = next((b for b in blackouts if b[0] <= t < b[1]), None)
        if inside is not None:
            why = why or f"{inside[2]} until {inside[1].astimezone(tz).strftime('%Y-%m-%d %H:%M %Z')}"
            t = inside[1]
            continue
        local = t.astimezone(tz)
        d = local.date()
        if _window_day_ok(w, d) and start <= local.time() and (end is None or local.time() < end):
            return (t == now), (None if t == now else t), why
        hours = f"{w.start}-{w.end} {w.timezone}, {w.days.replace('_', ' ')}"
        why = why or f"outside the submission window ({hours})"
        if not (_window_day_ok(w, d) and local.time() < start):
            d += timedelta(days=1)
            while not _window_day_ok(w, d):
                d += timedelta(days=1)
        t = local_instant(d, start, tz)
    raise ValueError(f"route {route.name}: the submission window never opens")


def hold_for_window(config: "Config", store: Store, sub_id: int, now: datetime | None = None) -> bool:
    """Before an upload starts: if the route's window is shut, keep the submission QUEUED until
    it opens (``next_attempt_at``, with the reason) and return True; the caller then does not
    upload. A reason this function set earlier is cleared once the window is open."""
    now = now or utcnow()
    sub = store.get(sub_id)
    if sub.state is not State.QUEUED:
        return False
    try:
        route = config.route(sub.route)
    except Exception:  # noqa: BLE001 - a retired route: the upload path reports it
        return False
    allowed, next_open, why = window_allows(route, now)
    if allowed:
        if sub.reason and sub.reason.startswith(WINDOW_REASON):
            store.update(sub_id, reason=None)
        return False
    w = route.submission_window
    opens = next_open.astimezone(ZoneInfo(w.timezone)).strftime("%Y-%m-%d %H:%M %Z") if (w and next_open) else "?"
    store.update(sub_id, next_attempt_at=next_open, reason=f"{WINDOW_REASON}: {why}; goes out at {opens}")
    log.info("submission %s (%s): held until the submission window opens at %s", sub_id, sub.file_name, opens)
    return True
