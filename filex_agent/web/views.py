"""What the pages show, assembled from the journal's read-only Store methods (no web code)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone

from filex_agent.config import Config
from filex_agent.metrics import LATENCY_BUCKETS
from filex_agent.store import Store, Submission, SubmissionQuery, open_state_names

# Open states shown in their own column; any other open state (HELD, UNCONFIRMED, one added
# later) gets a column named after it when a route has such rows.
OPEN_COLUMNS: tuple[tuple[str, frozenset[str]], ...] = (
    ("waiting", frozenset({"CLAIMING", "QUEUED"})),
    ("uploading", frozenset({"UPLOADING"})),
    ("awaiting FINRA", frozenset({"SUBMITTED"})),
)
OUTCOMES = ("ACCEPTED", "REJECTED", "PARTIALLY_REJECTED", "FAILED")
# Rows in these states are problems whatever else they show (the name is enough: a state added
# to State later needs no code here).
PROBLEM_STATES = ("UNCONFIRMED",)
RECENT = 10
PROBLEMS_SHOWN = 100
CHART_DAYS = 30
# Drop → submitted buckets (seconds): the metric filex_drop_to_submitted_seconds' own.
LATENCY_BOUNDS = tuple(float(b) for b in LATENCY_BUCKETS)


def local_midnight(d: date) -> datetime:
    """The start of local day ``d`` as an aware UTC datetime (the journal's time zone)."""
    return datetime.combine(d, time()).astimezone().astimezone(timezone.utc)


@dataclass
class RouteRow:
    name: str
    open: dict[str, int] = field(default_factory=dict)  # column -> count
    today: dict[str, int] = field(default_factory=dict)  # final state -> count


@dataclass
class Problem:
    kind: str  # FLAG, STUCK, UNCONFIRMED, ROUTE_DOWN, or a state name
    text: str
    submission: Submission | None = None
    route: str | None = None


@dataclass
class Overview:
    now: datetime
    routes: list[RouteRow]
    open_columns: list[str]
    outcome_columns: list[str]
    problems: list[Problem]
    recent: list[Submission]
    last_poll: datetime | None


def overview(store: Store, cfg: Config, *, now: datetime | None = None,
             last_poll: Callable[[], float | None] | None = None,
             active_problems: Callable[[], set[str]] | None = None) -> Overview:
    now = now or datetime.now(timezone.utc)
    day_start = local_midnight(now.astimezone().date())
    open_counts = store.open_counts()
    final_counts = store.final_counts(day_start, local_midnight(now.astimezone().date() + timedelta(days=1)))
    names = [r.name for r in cfg.routes]
    names += sorted({r for r, _ in [*open_counts, *final_counts]} - set(names))
    rows = {n: RouteRow(n) for n in names}
    fixed = {s: col for col, states in OPEN_COLUMNS for s in states}
    extra: set[str] = set()
    for (route, state), n in open_counts.items():
        col = fixed.get(state, state)
        if col == state:
            extra.add(state)
        rows[route].open[col] = rows[route].open.get(col, 0) + n
    outcome_extra: set[str] = set()
    for (route, state), n in final_counts.items():
        if state not in OUTCOMES:
            outcome_extra.add(state)
        rows[route].today[state] = rows[route].today.get(state, 0) + n
    poll = last_poll() if last_poll else None
    return Overview(
        now=now, routes=list(rows.values()), open_columns=[c for c, _ in OPEN_COLUMNS] + sorted(extra),
        outcome_columns=list(OUTCOMES) + sorted(outcome_extra),
        problems=problems(store, cfg, now, active_problems() if active_problems else set()),
        recent=store.search(SubmissionQuery(), RECENT).rows,
        last_poll=datetime.fromtimestamp(poll, timezone.utc) if poll else None)


def problems(store: Store, cfg: Config, now: datetime, active: set[str]) -> list[Problem]:
    """Flags, rows in a problem state, open rows without a verdict for too long, routes down."""
    limit = timedelta(hours=cfg.tracking.final_timeout_hours)
    out: list[Problem] = []
    for key in sorted(active):
        kind, _, route = key.partition(":")
        if kind == "ROUTE_DOWN":
            out.append(Problem("ROUTE_DOWN", f"route {route} has not been able to submit for "
                               f"{cfg.notify.route_down_minutes:g} min or more; files wait and are retried",
                               route=route))
    open_names = set(open_state_names())
    for sub in store.problems(PROBLEM_STATES, now - limit, PROBLEMS_SHOWN):
        state = sub.state.value
        since = sub.uploaded_at or sub.created_at
        if state in PROBLEM_STATES:
            out.append(Problem(state, sub.flag or sub.reason or f"state {state}", sub, sub.route))
        elif state in open_names and now - since > limit:
            out.append(Problem("STUCK", f"no final status {(now - since).total_seconds() / 3600:.1f} h after "
                               f"{'upload' if sub.uploaded_at else 'drop'}" + (f"; {sub.flag}" if sub.flag else ""),
                               sub, sub.route))
        if sub.flag and state not in PROBLEM_STATES and not (state in open_names and now - since > limit):
            out.append(Problem("FLAG", sub.flag, sub, sub.route))
    return out


# -- charts ------------------------------------------------------------------------------------

@dataclass
class DayOutcomes:
    day: date
    counts: dict[str, int]


@dataclass
class DayLatency:
    day: date
    n: int
    p50: float | None
    p95: float | None


def chart_days(now: datetime, days: int = CHART_DAYS) -> list[date]:
    today = now.astimezone().date()
    return [today - timedelta(days=days - 1 - i) for i in range(days)]


class DayCache:
    """Per-day chart figures of days that are over (they no longer change: nothing gets a final
    or upload time in the past), so a page asks the journal about today, plus once a day about
    the day that just ended. ``fetch(days)`` returns one value per day."""

    def __init__(self, fetch: Callable[[list[date]], list]):
        self._fetch = fetch
        self._done: dict[date, object] = {}
        self._lock = threading.Lock()

    def get(self, days: list[date], today: date) -> list:
        with self._lock:
            missing = [d for d in days if d not in self._done or d >= today]
        # Contiguous: the days before today that are not cached yet, then today (one query each run).
        fresh = dict(zip(missing, self._fetch(missing))) if missing else {}
        with self._lock:
            for d, v in fresh.items():
                if d < today:
                    self._done[d] = v
            for d in [d for d in self._done if d < days[0]]:
                del self._done[d]
            return [fresh[d] if d in fresh else self._done[d] for d in days]


def _edges(days: list[date]) -> list[datetime]:
    return [local_midnight(d) for d in days] + [local_midnight(days[-1] + timedelta(days=1))]


def outcome_counts(store: Store, days: list[date]) -> list[dict[str, int]]:
    """Final outcomes per local day of ``final_at`` (``days`` consecutive)."""
    hist = store.final_histogram(_edges(days))
    out: list[dict[str, int]] = [{} for _ in days]
    for (i, state), n in hist.items():
        out[i][state] = out[i].get(state, 0) + n
    return out


def latency_counts(store: Store, days: list[date]) -> list[list[int]]:
    """Drop → submitted histogram (over ``LATENCY_BOUNDS``) per local day of upload."""
    hist = store.latency_histogram(_edges(days), LATENCY_BOUNDS)
    return [[hist.get((i, j), 0) for j in range(len(LATENCY_BOUNDS) + 1)] for i in range(len(days))]


class Charts:
    """The two charts' figures for the last ``CHART_DAYS`` days, past days cached."""

    def __init__(self, store: Store):
        self.store = store
        self._outcomes = DayCache(lambda days: _by_run(days, lambda run: outcome_counts(store, run)))
        self._latency = DayCache(lambda days: _by_run(days, lambda run: latency_counts(store, run)))

    def warm(self) -> None:
        """Compute (and cache) the past days: the first page after a start then costs what the
        others do."""
        now = datetime.now(timezone.utc)
        self.outcomes(now)
        self.latency(now)

    def outcomes(self, now: datetime) -> list[DayOutcomes]:
        days = chart_days(now)
        return [DayOutcomes(d, c) for d, c in zip(days, self._outcomes.get(days, days[-1]))]

    def latency(self, now: datetime) -> list[DayLatency]:
        days = chart_days(now)
        return [DayLatency(d, sum(c), quantile(c, 0.5), quantile(c, 0.95))
                for d, c in zip(days, self._latency.get(days, days[-1]))]


def _by_run(days: list[date], fetch: Callable[[list[date]], list]) -> list:
    """``fetch`` over each run of consecutive days (one query per run), results in order."""
    out: list = []
    run: list[date] = []
    for d in days:
        if run and d != run[-1] + timedelta(days=1):
            out += fetch(run)
            run = []
        run.append(d)
    if run:
        out += fetch(run)
    return out


def quantile(counts: list[int], q: float) -> float | None:
    """The q-quantile of a histogram over ``LATENCY_BOUNDS`` (linear within the bucket, like
    Prometheus' histogram_quantile; the open last bucket answers its lower bound)."""
    n = sum(counts)
    if n == 0:
        return None
    rank = q * n
    seen = 0
    for j, c in enumerate(counts):
        if c and seen + c >= rank:
            if j == len(LATENCY_BOUNDS):
                return LATENCY_BOUNDS[-1]
            lo = LATENCY_BOUNDS[j - 1] if j else 0.0
            return lo + (LATENCY_BOUNDS[j] - lo) * (rank - seen) / c
        seen += c
    return LATENCY_BOUNDS[-1]


def human_seconds(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 10:
        return f"{s:.1f} s"
    if s < 90:
        return f"{s:.0f} s"
    if s < 600:
        return f"{s / 60:.1f} min"
    if s < 5400:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


