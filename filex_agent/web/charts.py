"""Server-rendered SVG charts: no script, no library, styled by classes from static/app.css.

Only numbers and dates we format go into the SVG; ``escape`` is applied to every text anyway.
"""

from __future__ import annotations

from html import escape

from markupsafe import Markup

from filex_agent.web.views import OUTCOMES, DayLatency, DayOutcomes, human_seconds

W, H = 720, 220
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 12, 28
CLASS = {"ACCEPTED": "ok", "REJECTED": "bad", "PARTIALLY_REJECTED": "partial", "FAILED": "failed"}


def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    step = 1.0
    while step * 10 < v:
        step *= 10
    for m in (1, 2, 5, 10):
        if m * step >= v:
            return m * step
    return 10 * step


def _frame(title: str, ymax: float, ylabel) -> list[str]:  # noqa: ANN001
    ih = H - TOP - BOTTOM
    parts = [f'<svg class="chart" viewBox="0 0 {W} {H}" role="img" aria-label="{escape(title)}" '
             'xmlns="http://www.w3.org/2000/svg">', f"<title>{escape(title)}</title>"]
    for i in range(5):
        y = TOP + ih - ih * i / 4
        parts.append(f'<line class="grid" x1="{LEFT}" y1="{y:.1f}" x2="{W - RIGHT}" y2="{y:.1f}"/>')
        parts.append(f'<text class="axis" x="{LEFT - 4}" y="{y + 4:.1f}" text-anchor="end">'
                     f"{escape(ylabel(ymax * i / 4))}</text>")
    return parts


def _x_labels(days, slot: float) -> list[str]:  # noqa: ANN001
    out = []
    for i, d in enumerate(days):
        if i % 5 == 0 or i == len(days) - 1:
            x = LEFT + slot * (i + 0.5)
            out.append(f'<text class="axis" x="{x:.1f}" y="{H - 8}" text-anchor="middle">{escape(d.strftime("%m-%d"))}</text>')
    return out


def outcomes_chart(data: list[DayOutcomes]) -> Markup:
    """Stacked bars: final outcomes per day."""
    totals = [sum(d.counts.values()) for d in data]
    ymax = _nice_max(max(totals, default=0))
    ymax = -(-ymax // 4) * 4  # whole numbers on the four grid lines
    ih = H - TOP - BOTTOM
    slot = (W - LEFT - RIGHT) / max(1, len(data))
    parts = _frame("Outcomes per day", ymax, lambda v: f"{v:g}")
    for i, d in enumerate(data):
        y = TOP + ih
        states = list(OUTCOMES) + sorted(set(d.counts) - set(OUTCOMES))
        for state in states:
            n = d.counts.get(state, 0)
            if not n:
                continue
            h = ih * n / ymax
            y -= h
            parts.append(f'<rect class="bar {CLASS.get(state, "other")}" x="{LEFT + slot * i + 1:.1f}" y="{y:.1f}" '
                         f'width="{max(1.0, slot - 2):.1f}" height="{h:.1f}"><title>{escape(d.day.isoformat())} '
                         f"{escape(state)}: {n}</title></rect>")
    parts += _x_labels([d.day for d in data], slot)
    parts.append("</svg>")
    return Markup("".join(parts))


def latency_chart(data: list[DayLatency]) -> Markup:
    """Drop → submitted per day: median (bars) and p95 (dots)."""
    ymax = _nice_max(max((d.p95 or 0 for d in data), default=0))
    ih = H - TOP - BOTTOM
    slot = (W - LEFT - RIGHT) / max(1, len(data))
    parts = _frame("Drop to submitted latency per day", ymax, human_seconds)
    for i, d in enumerate(data):
        if d.p50 is None:
            continue
        x = LEFT + slot * i
        h = ih * d.p50 / ymax
        tip = f"{d.day.isoformat()}: median {human_seconds(d.p50)}, p95 {human_seconds(d.p95)}, {d.n} upload(s)"
        parts.append(f'<rect class="bar median" x="{x + 1:.1f}" y="{TOP + ih - h:.1f}" width="{max(1.0, slot - 2):.1f}" '
                     f'height="{h:.1f}"><title>{escape(tip)}</title></rect>')
        y95 = TOP + ih - ih * (d.p95 or 0) / ymax
        parts.append(f'<circle class="p95" cx="{x + slot / 2:.1f}" cy="{y95:.1f}" r="3"><title>{escape(tip)}</title></circle>')
    parts += _x_labels([d.day for d in data], slot)
    parts.append("</svg>")
    return Markup("".join(parts))
