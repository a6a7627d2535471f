"""The Starlette application of the status page. Read-only: GET and HEAD only, every value
escaped by Jinja2's autoescape, feedback served by (submission id, feedback id) from the paths the
journal holds (never a path from the request), strict security headers on every answer."""

from __future__ import annotations

import calendar as std_calendar
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import anyio
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from filex_agent.config import Config
from filex_agent.filing_calendar import MISSED, calendar_rows
from filex_agent.store import FeedbackFile, PageKey, Store, SubmissionQuery, utcnow
from filex_agent.web import charts, views
from filex_agent.web.auth import Authenticator

HERE = Path(__file__).parent
PAGE_SIZE = 50
MAX_ID = 2**63 - 1  # ids are 64-bit integers in the journal: a longer number names nothing
FEEDBACK_SHOWN_BYTES = 256 * 1024
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
# Feedback text keeps its tabs and line ends (CRLF included: FINRA's files may use it).
_CONTROL_KEEP_LINES = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_STATE_NAME = re.compile(r"^[A-Z][A-Z_]{0,39}$")
_MONTH = re.compile(r"([0-9]{4})-([0-9]{2})")  # ASCII digits only, whole value (fullmatch)
# A month outside these years is a typo in the address, not a filing calendar.
MONTH_YEARS = range(1970, 2200)
# Calendar states as badge colours: the submission verdicts' classes, and a missed filing is bad.
CALENDAR_CLASS = {**charts.CLASS, MISSED: "bad"}


def visible(text: Any, keep_lines: bool = False) -> str:
    """Control and bidi-override characters as ``\\xNN``/``\\uNNNN`` text (then escaped by Jinja)."""
    if text is None:
        return ""
    pattern = _CONTROL_KEEP_LINES if keep_lines else _CONTROL
    return pattern.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                       else f"\\u{ord(m.group()):04x}", str(text))


def local_time(value: datetime | None) -> str:
    return "–" if value is None else value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def download_name(name: str) -> str:
    """A harmless file name for Content-Disposition (no path, no quotes, no control characters)."""
    name = unicodedata.normalize("NFKC", name).rsplit("/", 1)[-1].rsplit("\\", 1)[-1]
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    return safe[:120] or "feedback"


@dataclass
class Sources:
    """What the page reads: the journal, the configuration and, in the agent's own process, the
    last successful tracking poll and the problems the periodic checks hold open."""

    store: Store
    config: Callable[[], Config]
    last_poll: Callable[[], float | None] | None = None
    active_problems: Callable[[], set[str]] | None = None


class BadRequest(Exception):
    pass


def _env() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["visible"] = visible
    env.filters["local"] = local_time
    env.filters["seconds"] = views.human_seconds
    env.globals["state_class"] = lambda s: charts.CLASS.get(str(s), "other")
    env.globals["calendar_class"] = lambda s: CALENDAR_CLASS.get(str(s), "other")
    return env


def _parse_key(value: str | None, what: str) -> PageKey | None:
    if not value:
        return None
    at, sep, sub_id = value.rpartition("~")
    try:
        if not sep or not sub_id.isdigit():
            raise ValueError
        return PageKey(datetime.fromisoformat(at), int(sub_id))
    except ValueError:
        raise BadRequest(f"{what}: not a page position") from None


def _key(k: PageKey) -> str:
    return f"{k.created_at.isoformat()}~{k.id}"


def _parse_date(value: str | None, what: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise BadRequest(f"{what}: expected a date YYYY-MM-DD") from None


def _parse_month(value: str | None, today: date) -> date:
    """The first day of ``?month=YYYY-MM`` (absent: this month)."""
    if not value:
        return today.replace(day=1)
    m = _MONTH.fullmatch(value)
    if not m or int(m.group(1)) not in MONTH_YEARS or not 1 <= int(m.group(2)) <= 12:
        raise BadRequest(f"month: expected YYYY-MM between {MONTH_YEARS[0]} and {MONTH_YEARS[-1]}")
    return date(int(m.group(1)), int(m.group(2)), 1)


def _shift_month(first: date, months: int) -> date | None:
    n = first.year * 12 + first.month - 1 + months
    return date(n // 12, n % 12 + 1, 1) if n // 12 in MONTH_YEARS else None


def month_view(cfg: Config, store: Store, first: date, now: datetime) -> dict[str, Any]:
    """The calendar rows (the same as `filex-agent calendar`) of one month, by local day, as weeks."""
    nxt = _shift_month(first, 1) or date(first.year + 1, 1, 1)
    # Deadlines are grouped by their expectation's local day, which may be a UTC day off the month's edges.
    since = datetime.combine(first - timedelta(days=1), datetime.min.time(), tzinfo=timezone.utc)
    until = datetime.combine(nxt + timedelta(days=1), datetime.min.time(), tzinfo=timezone.utc)
    key = first.strftime("%Y-%m")
    rows = [r for r in calendar_rows(cfg, store, since, until, now) if r["day"].startswith(key)]
    by_day: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_day.setdefault(r["day"], []).append(r)
    weeks = std_calendar.Calendar(firstweekday=0).monthdatescalendar(first.year, first.month)
    prev, after = _shift_month(first, -1), _shift_month(first, 1)
    return {"rows": rows, "by_day": by_day, "weeks": weeks, "month": first, "today": now.astimezone().date(),
            "prev": prev.strftime("%Y-%m") if prev else None, "next": after.strftime("%Y-%m") if after else None,
            "configured": bool(cfg.expectations), "weekdays": list(std_calendar.day_abbr)}


def create_app(src: Sources, *, auth: Authenticator | None = None, allowed_hosts: set[str] | None = None,
               refresh_seconds: float = 5.0, hsts: bool = False, chart_data: views.Charts | None = None) -> Starlette:
    env = _env()
    chart_data = chart_data or views.Charts(src.store)

    def render(name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        ctx.setdefault("refresh_ms", int(refresh_seconds * 1000))
        return HTMLResponse(env.get_template(name).render(**ctx), status_code=status)

    def not_found(what: str) -> HTMLResponse:
        return render("error.html", 404, title="Not found", message=what)

    # -- overview --------------------------------------------------------------------------------
    def _overview():  # noqa: ANN202
        return views.overview(src.store, src.config(), last_poll=src.last_poll, active_problems=src.active_problems)

    def overview_page(request: Request) -> Response:
        ov = _overview()
        return render("overview.html", ov=ov, page="overview",
                      outcomes_svg=charts.outcomes_chart(chart_data.outcomes(ov.now)),
                      latency_svg=charts.latency_chart(chart_data.latency(ov.now)))

    def overview_fragment(request: Request) -> Response:
        return render("_overview.html", ov=_overview())

    # -- submissions -----------------------------------------------------------------------------
    def submissions_page(request: Request) -> Response:
        p = request.query_params
        try:
            text = (p.get("q") or "").strip()[:200] or None
            state = (p.get("state") or "").strip() or None
            if state is not None and not _STATE_NAME.match(state):
                raise BadRequest("state: not a state name")
            route = (p.get("route") or "").strip() or None
            d_from, d_to = _parse_date(p.get("from"), "from"), _parse_date(p.get("to"), "to")
            after, before = _parse_key(p.get("after"), "after"), _parse_key(p.get("before"), "before")
        except BadRequest as exc:
            return render("error.html", 400, title="Bad request", message=str(exc))
        query = SubmissionQuery(
            text=text, states=(state,) if state else None, route=route,
            created_from=views.local_midnight(d_from) if d_from else None,
            created_to=views.local_midnight(d_to + timedelta(days=1)) if d_to else None)
        page = src.store.search(query, PAGE_SIZE, after=after, before=None if after else before)
        form = {"q": text or "", "state": state or "", "route": route or "",
                "from": d_from.isoformat() if d_from else "", "to": d_to.isoformat() if d_to else ""}
        base = {k: v for k, v in form.items() if v}
        older = "?" + urlencode({**base, "after": _key(page.older)}) if page.older else None
        newer = "?" + urlencode({**base, "before": _key(page.newer)}) if page.newer else None
        cfg = src.config()
        states = list(views.open_state_names()) + list(views.OUTCOMES)
        return render("submissions.html", page="submissions", rows=page.rows, form=form, older=older, newer=newer,
                      routes=[r.name for r in cfg.routes], states=states)

    def _submission_ctx(sub_id: int) -> dict[str, Any] | None:
        if sub_id > MAX_ID:
            return None
        try:
            sub = src.store.get(sub_id)
        except KeyError:
            return None
        feedback = []
        for f in src.store.feedback_for(sub_id):
            feedback.append({"file": f, "text": _read_feedback(f)})
        return {"sub": sub, "events": src.store.events(sub_id), "feedback": feedback,
                "attempts": src.store.attempts(sub_id)}

    def submission_page(request: Request) -> Response:
        ctx = _submission_ctx(request.path_params["sub_id"])
        if ctx is None:
            return not_found(f"no submission {request.path_params['sub_id']}")
        return render("submission.html", page="submissions", **ctx)

    def submission_fragment(request: Request) -> Response:
        ctx = _submission_ctx(request.path_params["sub_id"])
        if ctx is None:
            return not_found(f"no submission {request.path_params['sub_id']}")
        return render("_submission.html", **ctx)

    # -- filing calendar -------------------------------------------------------------------------
    def calendar_page(request: Request) -> Response:
        now = utcnow()
        try:
            first = _parse_month(request.query_params.get("month"), now.astimezone().date())
        except BadRequest as exc:
            return render("error.html", 400, title="Bad request", message=str(exc))
        return render("calendar.html", page="calendar", **month_view(src.config(), src.store, first, now))

    def feedback_download(request: Request) -> Response:
        sub_id, fid = request.path_params["sub_id"], request.path_params["feedback_id"]
        f = src.store.feedback_file(sub_id, fid) if max(sub_id, fid) <= MAX_ID else None
        if f is None or not f.local_path:
            return not_found(f"no feedback {fid} for submission {sub_id}")
        try:
            data = Path(f.local_path).read_bytes()
        except OSError:
            return not_found(f"feedback {fid} of submission {sub_id} is no longer on disk")
        name = download_name(f.remote_name)
        return Response(data, media_type="application/octet-stream", headers={
            "Content-Disposition": f"attachment; filename=\"{name}\"; filename*=UTF-8''{quote(name)}"})

    routes = [
        Route("/", overview_page),
        Route("/fragment/overview", overview_fragment),
        Route("/submissions", submissions_page),
        Route("/calendar", calendar_page),
        Route("/submissions/{sub_id:int}", submission_page),
        Route("/fragment/submissions/{sub_id:int}", submission_fragment),
        Route("/submissions/{sub_id:int}/feedback/{feedback_id:int}", feedback_download),
        Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes)
    return _Guard(app, auth=auth, allowed_hosts=allowed_hosts, hsts=hsts)  # type: ignore[return-value]


def _read_feedback(f: FeedbackFile) -> dict[str, Any]:
    """The feedback file's text for the page (at most FEEDBACK_SHOWN_BYTES), or why not."""
    if not f.local_path:
        return {"error": "not downloaded"}
    try:
        with open(f.local_path, "rb") as fh:
            data = fh.read(FEEDBACK_SHOWN_BYTES + 1)
    except OSError as exc:
        return {"error": f"cannot read it: {exc.strerror}"}
    truncated = len(data) > FEEDBACK_SHOWN_BYTES
    return {"text": data[:FEEDBACK_SHOWN_BYTES].decode("utf-8", "replace"), "truncated": truncated}


class _Guard:
    """ASGI wrapper: GET/HEAD only, Host check (DNS rebinding), authentication, security headers."""

    def __init__(self, app: Any, *, auth: Authenticator | None, allowed_hosts: set[str] | None, hsts: bool):
        self.app = app
        self.auth = auth
        self.allowed_hosts = allowed_hosts
        self.headers = list(SECURITY_HEADERS)
        if hsts:
            self.headers.append((b"strict-transport-security", b"max-age=31536000"))

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if scope["method"] not in ("GET", "HEAD"):
            return await self._plain(send, 405, "read-only: GET only\n", [(b"allow", b"GET, HEAD")])
        if self.allowed_hosts is not None:
            host = headers.get("host", "")
            name = host[1:].split("]", 1)[0] if host.startswith("[") else host.rsplit(":", 1)[0]
            if name.lower() not in self.allowed_hosts:
                return await self._plain(send, 421, "unknown host\n")
        if self.auth is not None:
            ok = await anyio.to_thread.run_sync(self.auth.check, headers.get("authorization"))
            if not ok:
                return await self._plain(send, 401, "authentication required\n", [
                    (b"www-authenticate", b'Basic realm="filex-agent status", charset="UTF-8"')])

        async def send_secure(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [*message.get("headers", []), *self.headers]
            await send(message)

        await self.app(scope, receive, send_secure)

    async def _plain(self, send: Any, status: int, text: str, extra: list | None = None) -> None:
        body = text.encode()
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
            *self.headers, *(extra or [])]})
        await send({"type": "http.response.body", "body": body})


