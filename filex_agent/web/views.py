"""What the pages show, assembled from the journal's read-only Store methods (no web code)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone

from filex_agent.config import Config
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
RECENT = 15
PROBLEMS_SHOWN = 100
CHART_DAYS = 30
LATENCY_SAMPLE = 20_000


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
    final_counts = store.final_counts(day_start)
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


def outcomes_per_day(store: Store, now: datetime, days: int = CHART_DAYS) -> list[DayOutcomes]:
    ds = chart_days(now, days)
    edges = [local_midnight(d) for d in ds] + [local_midnight(ds[-1] + timedelta(days=1))]
    hist = store.final_histogram(edges)
    out = [DayOutcomes(d, {}) for d in ds]
    for (i, state), n in hist.items():
        out[i].counts[state] = out[i].counts.get(state, 0) + n
    return out


def latency_per_day(store: Store, now: datetime, days: int = CHART_DAYS) -> list[DayLatency]:
    """Drop → submitted (created_at → uploaded_at) per local day of upload: median and p95, over
    at most the ``LATENCY_SAMPLE`` most recent uploads."""
    ds = chart_days(now, days)
    samples: dict[date, list[float]] = {d: [] for d in ds}
    for created, uploaded in store.upload_times(local_midnight(ds[0]), LATENCY_SAMPLE):
        d = uploaded.astimezone().date()
        if d in samples:
            samples[d].append(max(0.0, (uploaded - created).total_seconds()))
    out = []
    for d in ds:
        xs = sorted(samples[d])
        if not xs:
            out.append(DayLatency(d, 0, None, None))
        else:
            p95 = xs[min(len(xs) - 1, int(0.95 * len(xs)))]
            out.append(DayLatency(d, len(xs), statistics.median(xs), p95))
    return out


def human_seconds(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 10:
        return f"{s:.1f} s"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


