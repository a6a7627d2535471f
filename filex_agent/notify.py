"""Alerts for people: a JSON webhook and/or e-mail, deduplicated per ongoing problem.

``Notifier.notify(n, key)`` is non-blocking: it records the alert (and logs it at WARNING,
so an alert is never silent even without channels) and hands it to a background thread that
delivers it with retries. The same ``key`` is not re-sent within ``realert_seconds``;
``resolve(key)`` ends the problem so its next occurrence alerts at once. A delivery that fails
on every channel forgets the key, so the next occurrence tries again.
"""

from __future__ import annotations

import email.utils
import logging
import queue
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field
from tenacity import (RetryCallState, Retrying, retry_if_exception, stop_after_attempt,
                      wait_exponential_jitter)

from filex_agent.logging_setup import escape_controls, redact, register_secret

log = logging.getLogger(__name__)

KINDS = ("REJECTED", "PARTIALLY_REJECTED", "FAILED", "STUCK", "ROUTE_DOWN",
         # the filing calendar (filex_agent/filing_calendar.py)
         "NOT_DROPPED", "AT_RISK", "REJECTED_BEFORE_DUE", "MISSED")
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER = 300.0  # a server asking for longer is treated as "give up for now"


@dataclass
class Notification:
    kind: str
    subject: str
    text: str
    submission_id: int | None = None
    file: str | None = None
    route: str | None = None
    feedback: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown notification kind {self.kind!r}; one of {', '.join(KINDS)}")
        # The text quotes failure reasons (exception messages): scrubbed like a log line. The
        # subject and file name become a mail header: one line, whatever the file was called.
        self.text = redact(self.text)
        self.subject = escape_controls(redact(self.subject))
        self.file = None if self.file is None else escape_controls(self.file)
        self.feedback = [redact(p) for p in self.feedback]

    def render(self) -> str:
        """Plain-text body: what happened, to which file, where its feedback is."""
        lines = [self.text.rstrip(), "", f"What:       {self.kind}"]
        if self.file:
            lines.append(f"File:       {self.file}")
        if self.route:
            lines.append(f"Route:      {self.route}")
        if self.submission_id is not None:
            lines.append(f"Submission: {self.submission_id}")
        if self.feedback:
            lines.append("Feedback:")
            lines += [f"  {p}" for p in self.feedback]
        elif self.kind in ("REJECTED", "PARTIALLY_REJECTED"):
            lines.append("Feedback:   none downloaded yet")
        lines.append(f"Host:       {socket.gethostname()}")
        return "\n".join(lines) + "\n"


class SmtpSettings(BaseModel):
    """SMTP relay. ``password`` is the resolved secret (never shown in repr)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str
    port: int = Field(587, ge=1, le=65535)
    username: str | None = None
    password: str | None = Field(None, repr=False)
    from_addr: str
    to_addrs: list[str] = Field(min_length=1)
    # STARTTLS is required by default; without it no login is attempted (no cleartext password).
    starttls: bool = True
    # Extra CA bundle (private relay, tests); verification stays on either way.
    ca_file: Path | None = None


class _RetryableStatus(Exception):
    def __init__(self, status: int, retry_after: float | None):
        self.status = status
        self.retry_after = retry_after
        super().__init__(f"HTTP {status}")


class _Aborted(Exception):
    pass


@dataclass
class _Item:
    n: Notification
    key: str
    stamp: float
    time: str


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class Notifier:
    def __init__(self, *, webhook_url: str | None = None, smtp: SmtpSettings | None = None,
                 realert_seconds: float = 3600, clock: Callable[[], float] = time.time,
                 max_attempts: int = 5, timeout: float = 10,
                 backoff_initial: float = 1.0, backoff_max: float = 60.0, queue_size: int = 1000):
        if webhook_url is not None and urlsplit(webhook_url).scheme not in ("https", "http"):
            raise ValueError("webhook_url must be an http(s) URL")
        self._webhook_url = webhook_url
        self._smtp = smtp
        self._realert = realert_seconds
        self._clock = clock
        self._max_attempts = max(1, max_attempts)
        self._timeout = timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        # Chat webhook URLs carry their token in the path: treat the whole URL as a secret.
        register_secret(webhook_url)
        register_secret(smtp.password if smtp else None)
        self._lock = threading.Lock()
        self._sent: dict[str, float] = {}
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=queue_size)
        self._pending = 0
        self._idle = threading.Condition(self._lock)
        self._abort = threading.Event()
        self._stopped = False
        self._http: httpx.Client | None = None
        self._thread: threading.Thread | None = None
        if self.has_channels:
            self._http = httpx.Client(timeout=timeout, follow_redirects=False,
                                      headers={"User-Agent": "filex-agent"}) if webhook_url else None
            self._thread = threading.Thread(target=self._run, name="notifier", daemon=True)
            self._thread.start()

    @property
    def has_channels(self) -> bool:
        return bool(self._webhook_url or self._smtp)

    # -- public API ------------------------------------------------------------------------

    def notify(self, n: Notification, key: str) -> bool:
        """Alert about an ongoing problem; False if deduplicated, not deliverable or dropped."""
        with self._lock:
            now = self._clock()
            last = self._sent.get(key)
            if last is not None and now - last < self._realert:
                log.debug("notification %s suppressed (already alerted %.0fs ago)", key, now - last)
                return False
            self._sent[key] = now
        log.warning("ALERT %s: %s", n.kind, n.subject,
                    extra={"alert_key": key, "submission_id": n.submission_id, "file": n.file,
                           "route": n.route, "feedback": n.feedback})
        if not self.has_channels:
            return False
        item = _Item(n, key, now, datetime.now(timezone.utc).isoformat(timespec="seconds"))
        with self._lock:
            if self._stopped:
                self._sent.pop(key, None)
                log.error("notifier stopped: alert %s not delivered", key)
                return False
            try:
                self._queue.put_nowait(item)
            except queue.Full:
                self._forget(key, now)
                log.error("notification queue full: alert %s dropped", key)
                return False
            self._pending += 1
        return True

    def resolve(self, key: str) -> None:
        with self._lock:
            self._sent.pop(key, None)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued alert was delivered or given up; True if the queue drained."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def stop(self, timeout: float = 10) -> None:
        """Deliver what is queued within ``timeout``, then abandon the rest."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._abort.set()  # interrupt retry waits
                self._thread.join(2)
        if self._http is not None:
            self._http.close()

    # -- delivery --------------------------------------------------------------------------

    def _forget(self, key: str, stamp: float) -> None:
        if self._sent.get(key) == stamp:
            del self._sent[key]

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                delivered = self._deliver(item)
                if not delivered:
                    with self._lock:
                        self._forget(item.key, item.stamp)
            except Exception:  # never let the worker die
                log.exception("notification %s: unexpected error", item.key)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def _deliver(self, item: _Item) -> bool:
        ok = False
        if self._webhook_url:
            try:
                self._retrying(_http_retryable)(self._post_webhook, item)
                ok = True
                log.info("alert %s sent to webhook %s", item.key, urlsplit(self._webhook_url).hostname)
            except _Aborted:
                log.error("alert %s: webhook delivery abandoned at shutdown", item.key)
            except Exception as exc:
                log.error("alert %s: webhook %s failed: %s", item.key,
                          urlsplit(self._webhook_url).hostname, _describe(exc))
        if self._smtp:
            try:
                self._retrying(_smtp_retryable)(self._send_mail, item)
                ok = True
                log.info("alert %s e-mailed to %s", item.key, ", ".join(self._smtp.to_addrs))
            except _Aborted:
                log.error("alert %s: e-mail abandoned at shutdown", item.key)
            except Exception as exc:
                log.error("alert %s: e-mail via %s failed: %s", item.key, self._smtp.host, _describe(exc))
        return ok

    def _retrying(self, predicate: Callable[[BaseException], bool]) -> Retrying:
        backoff = wait_exponential_jitter(initial=self._backoff_initial, max=self._backoff_max,
                                          jitter=self._backoff_initial)

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, _RetryableStatus) and exc.retry_after is not None:
                return min(exc.retry_after, MAX_RETRY_AFTER)
            return backoff(state)

        def sleep(seconds: float) -> None:
            if self._abort.wait(seconds):
                raise _Aborted()

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning("alert delivery attempt %d failed (%s); retrying in %.1fs",
                        state.attempt_number, _describe(exc), state.next_action.sleep if state.next_action else 0)

        return Retrying(stop=stop_after_attempt(self._max_attempts), wait=wait, sleep=sleep,
                        retry=retry_if_exception(predicate), before_sleep=before_sleep, reraise=True)

    def _post_webhook(self, item: _Item) -> None:
        assert self._http is not None and self._webhook_url is not None
        payload: dict[str, Any] = asdict(item.n)
        payload.update(time=item.time, host=socket.gethostname(), key=item.key, message=item.n.render())
        r = self._http.post(self._webhook_url, json=payload)
        if r.status_code in RETRYABLE_STATUS:
            raise _RetryableStatus(r.status_code, parse_retry_after(r.headers.get("Retry-After")))
        if r.status_code >= 300:
            raise _PermanentStatus(r.status_code)

    def _send_mail(self, item: _Item) -> None:
        s = self._smtp
        assert s is not None
        msg = EmailMessage()
        msg["Subject"] = f"[filex-agent] {item.n.kind}: {item.n.subject}"
        msg["From"] = s.from_addr
        msg["To"] = ", ".join(s.to_addrs)
        msg["Date"] = email.utils.formatdate(localtime=False)
        msg["Message-ID"] = email.utils.make_msgid(domain=socket.gethostname() or "filex-agent")
        msg["X-Filex-Alert-Key"] = item.key
        msg.set_content(item.n.render())
        with smtplib.SMTP(s.host, s.port, timeout=self._timeout) as smtp:
            smtp.ehlo()
            if s.starttls:
                context = ssl.create_default_context(cafile=str(s.ca_file) if s.ca_file else None)
                # No fallback: a relay without STARTTLS raises SMTPNotSupportedError (permanent).
                smtp.starttls(context=context)
                smtp.ehlo()
            if s.username:
                if not s.starttls:
                    raise _InsecureLogin("refusing to send the SMTP password without STARTTLS")
                smtp.login(s.username, s.password or "")
            smtp.send_message(msg)


class _PermanentStatus(Exception):
    def __init__(self, status: int):
        self.status = status
        super().__init__(f"HTTP {status}")


class _InsecureLogin(Exception):
    pass


def _describe(exc: BaseException | None) -> str:
    """Short, secret-free description (httpx messages can embed the URL)."""
    if exc is None:
        return "unknown error"
    if isinstance(exc, (_RetryableStatus, _PermanentStatus, _InsecureLogin)):
        return str(exc)
    if isinstance(exc, smtplib.SMTPResponseException):
        return f"SMTP {exc.smtp_code}"
    if isinstance(exc, httpx.HTTPError):
        return type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


def _http_retryable(exc: BaseException) -> bool:
    return isinstance(exc, (_RetryableStatus, httpx.TransportError))


def _smtp_retryable(exc: BaseException) -> bool:
    if isinstance(exc, smtplib.SMTPResponseException):  # 4xx: try again later; 5xx: permanent
        return 400 <= exc.smtp_code < 500
    if isinstance(exc, (smtplib.SMTPRecipientsRefused, smtplib.SMTPNotSupportedError,
                        ssl.SSLCertVerificationError, _InsecureLogin)):
        return False
    return isinstance(exc, (OSError, smtplib.SMTPServerDisconnected))
