"""Observers of the pipeline (audit trail, metrics, notifications), decoupled from it.

The pipeline calls ``Hooks`` after each journal change; a hook must never break the
pipeline, so ``MultiHooks`` logs and swallows their errors.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from filex_agent.store import Submission

log = logging.getLogger(__name__)


class Hooks:
    def submission_changed(self, sub: "Submission", event: str) -> None:
        """After every state change, with a short event name (claimed, uploaded, ACCEPTED...)."""

    def submissions_changed(self, subs: list["Submission"], event: str) -> None:
        """The same event for several submissions at once (a batch of claims)."""
        for sub in subs:
            self.submission_changed(sub, event)

    def bytes_sent(self, route: str, transport: str, n: int) -> None:
        """Progress of an upload."""

    def retry(self, operation: str) -> None:
        """A remote call was retried."""

    def tracking_polled(self, ok: bool) -> None:
        """A tracking cycle finished."""


class LoggingHooks(Hooks):
    def submission_changed(self, sub: "Submission", event: str) -> None:
        level = logging.WARNING if event in ("FAILED", "REJECTED", "PARTIALLY_REJECTED", "HELD") else logging.INFO
        log.log(level, "submission %s %s: %s route=%s state=%s%s", sub.id, event, sub.file_name, sub.route,
                sub.state, f" reason={sub.reason}" if sub.reason else "")


class MultiHooks(Hooks):
    def __init__(self, *hooks: Hooks):
        self.hooks = list(hooks)

    def _each(self, name: str, *args: object) -> None:
        for h in self.hooks:
            try:
                getattr(h, name)(*args)
            except Exception:  # noqa: BLE001 - an observer must never break the pipeline
                log.exception("hook %s.%s failed", type(h).__name__, name)

    def submission_changed(self, sub: "Submission", event: str) -> None:
        self._each("submission_changed", sub, event)

    def submissions_changed(self, subs: list["Submission"], event: str) -> None:
        self._each("submissions_changed", subs, event)

    def bytes_sent(self, route: str, transport: str, n: int) -> None:
        self._each("bytes_sent", route, transport, n)

    def retry(self, operation: str) -> None:
        self._each("retry", operation)

    def tracking_polled(self, ok: bool) -> None:
        self._each("tracking_polled", ok)
