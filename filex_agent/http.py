"""Shared HTTP plumbing: the one retry policy, the FINRA rate limit, status mapping, redaction.

Every remote call of the agent (FIP, fileX REST, pre-signed S3 URLs) goes through
``RetryPolicy.call`` so that backoff, Retry-After and attempt bounds behave the same everywhere.
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import re
import ssl
import threading
import time
from typing import Any, Callable, TypeVar

import httpx
import tenacity

from filex_agent.config import NetworkSettings
from filex_agent.errors import AuthError, NotEntitledError, PermanentError, TransientError, UploadUnconfirmed

log = logging.getLogger(__name__)

T = TypeVar("T")

USER_AGENT = "filex-agent/0.1"
_EXCERPT_CHARS = 160


class HttpTransientError(TransientError):
    """A TransientError that knows the HTTP status and the server's Retry-After (seconds)."""

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class HttpPermanentError(PermanentError):
    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status


class HttpAuthError(AuthError):
    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status


class HttpNotEntitledError(NotEntitledError):
    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------- redaction

_URL_QUERY_RE = re.compile(r"(https?://[^\s?#\"'<>]*)\?[^\s\"'<>]*", re.IGNORECASE)
# Runs that look like tokens/keys/signatures (JWT parts, STS session tokens, base64 blobs);
# only applied to server bodies, where a file path or name is not worth the risk.
_TOKENISH_RE = re.compile(r"[A-Za-z0-9+/=_\-%*]{40,}")
_AMZ_PARAM_RE = re.compile(r"(X-Amz-(?:Signature|Security-Token|Credential)=)[^&\s\"'<>]*", re.IGNORECASE)


def redact_url(url: str | httpx.URL) -> str:
    """The URL without its query string: a pre-signed URL's query is a bearer secret."""
    text = str(url)
    cut = min((i for i in (text.find("?"), text.find("#")) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut] + "?<redacted>"


def redact_text(text: str, *, tokens: bool = False) -> str:
    """Scrub free text before it is shown: URL query strings and X-Amz secrets always;
    with ``tokens``, also any long token-like run (for bodies written by servers)."""
    text = _URL_QUERY_RE.sub(lambda m: m.group(1) + "?<redacted>", text)
    text = _AMZ_PARAM_RE.sub(lambda m: m.group(1) + "<redacted>", text)
    return _TOKENISH_RE.sub("<redacted>", text) if tokens else text


class _RedactingFilter(logging.Filter):
    """httpx logs every request URL at INFO; pre-signed URLs must not reach the logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken record is not ours to fix
            return True
        record.msg = redact_text(message)
        record.args = ()
        return True


_FILTER = _RedactingFilter()
for _name in ("httpx", "httpcore.connection", "httpcore.http11", "httpcore.http2",
              "httpcore.proxy", "httpcore.socks"):
    _lg = logging.getLogger(_name)
    if not any(isinstance(f, _RedactingFilter) for f in _lg.filters):
        _lg.addFilter(_FILTER)


# --------------------------------------------------------------------------- status mapping

def parse_retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Retry-After as seconds (delta-seconds or HTTP-date); None if absent or unparseable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now())


def body_excerpt(resp: httpx.Response) -> str:
    """A short, secret-free summary of an error body (S3 XML, FINRA JSON or text)."""
    try:
        raw = resp.read()
    except (httpx.HTTPError, httpx.StreamError):
        return ""
    text = raw[:4096].decode("utf-8", errors="replace").strip()
    if not text:
        return ""
    # S3 error XML: only Code and Message (StringToSign/CanonicalRequest echo signed params).
    code = re.search(r"<Code>([^<]{0,80})</Code>", text)
    if code:
        msg = re.search(r"<Message>([^<]{0,200})</Message>", text)
        text = code.group(1) + (": " + msg.group(1) if msg else "")
    elif text[:1] in "{[":
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if isinstance(data, dict):
            parts = [str(data[k]) for k in ("error", "error_description", "statusDescription", "message")
                     if isinstance(data.get(k), (str, int)) and str(data[k])]
            if parts:
                text = "; ".join(parts)
    text = " ".join(redact_text(text, tokens=True).split())
    return text if len(text) <= _EXCERPT_CHARS else text[: _EXCERPT_CHARS - 3] + "..."


def raise_for_status(resp: httpx.Response, what: str) -> None:
    """Map a non-2xx response to the agent's error taxonomy (message never carries a secret)."""
    status = resp.status_code
    if 200 <= status < 300:
        return
    excerpt = body_excerpt(resp)
    message = f"{what}: HTTP {status}" + (f" {excerpt}" if excerpt else "")
    # The FINRA API docs list "410 Unauthorized"; treat it like 401 rather than as Gone.
    if status in (401, 410):
        raise HttpAuthError(message, status=status)
    if status == 403:
        raise HttpNotEntitledError(message, status=status)
    if status in (408, 425, 429) or status >= 500:
        raise HttpTransientError(message, status=status,
                                 retry_after=parse_retry_after(resp.headers.get("Retry-After")))
    raise HttpPermanentError(message, status=status)


def transport_error(exc: httpx.HTTPError, what: str) -> TransientError | PermanentError:
    """httpx transport failures: timeouts and dropped connections are transient."""
    detail = redact_text(str(exc)) or type(exc).__name__
    if isinstance(exc, (httpx.UnsupportedProtocol, httpx.InvalidURL)):
        return PermanentError(f"{what}: {detail}")
    return HttpTransientError(f"{what}: {type(exc).__name__}: {detail}")


# --------------------------------------------------------------------------- retry

class RetryPolicy:
    """Bounded retries of TransientError with capped exponential backoff and full jitter.

    A Retry-After on the error is the minimum wait; if it is longer than ``backoff_max`` the
    error is raised at once (with ``retry_after`` still on it) so the caller reschedules
    instead of blocking a worker. An error that already exhausted a policy (nested calls) is
    not retried again, so attempts never multiply.
    """

    def __init__(
        self,
        max_attempts: int = 5,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        on_retry: Callable[[str], None] | None = None,
        jitter: Callable[[float, float], float] = random.uniform,
    ):
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.max_attempts = max_attempts
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._sleep = sleep
        self._on_retry = on_retry
        self._jitter = jitter

    @classmethod
    def from_settings(cls, net: NetworkSettings, **kwargs: Any) -> "RetryPolicy":
        return cls(net.max_attempts, net.backoff_initial, net.backoff_max, **kwargs)

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, initial * 2**(attempt-1))]."""
        cap = min(self.backoff_max, self.backoff_initial * (2 ** max(0, attempt - 1)))
        return self._jitter(0.0, cap)

    def _wait(self, state: tenacity.RetryCallState) -> float:
        wait = self.backoff(state.attempt_number)
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            wait = max(wait, float(retry_after))
        return wait

    def _should_retry(self, exc: BaseException) -> bool:
        # UploadUnconfirmed: the bytes may have landed; only the reconciler may send them again.
        return (isinstance(exc, TransientError) and not isinstance(exc, UploadUnconfirmed)
                and not getattr(exc, "retries_exhausted", False))

    def _stop(self, state: tenacity.RetryCallState) -> bool:
        if state.attempt_number >= self.max_attempts:
            return True
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        return retry_after is not None and float(retry_after) > self.backoff_max

    def _before_sleep(self, op: str) -> Callable[[tenacity.RetryCallState], None]:
        def hook(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            log.warning("%s failed (attempt %d/%d): %s; retrying in %.1fs",
                        op, state.attempt_number, self.max_attempts, exc, wait)
            if self._on_retry is not None:
                self._on_retry(op)

        return hook

    def call(self, op: str, fn: Callable[[], T]) -> T:
        def attempt() -> T:
            try:
                return fn()
            except httpx.HTTPError as exc:
                raise transport_error(exc, op) from exc

        retrying = tenacity.Retrying(
            stop=self._stop,
            wait=self._wait,
            retry=tenacity.retry_if_exception(self._should_retry),
            sleep=self._sleep,
            before_sleep=self._before_sleep(op),
            reraise=True,
        )
        try:
            return retrying(attempt)
        except TransientError as exc:
            # Tell enclosing policies not to retry this again.
            exc.retries_exhausted = True  # type: ignore[attr-defined]
            raise


# --------------------------------------------------------------------------- rate limit

class RateLimiter:
    """Thread-safe token bucket for one host. ``burst`` defaults to 1: requests evenly spaced at
    ``rate``/s, so no one-second window ever sees more than ``rate`` (+1) requests.

    FINRA's limit is per IP: a ``Retry-After`` seen by one request (``pause``) holds every request
    through this limiter until it has passed, not only the refused one. A pause longer than
    ``max_wait`` is not slept out: ``acquire`` raises a TransientError carrying the remaining
    time, so the caller reschedules instead of blocking a worker."""

    def __init__(self, rate: float, burst: int | None = None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, max_wait: float = float("inf")):
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.rate = float(rate)
        self.burst = max(1, int(burst if burst is not None else 1))
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = float(self.burst)
        self._last = clock()
        self.max_wait = max_wait
        self._paused_until = float("-inf")

    def pause(self, seconds: float) -> None:
        """The host said Retry-After: no request through this limiter before ``seconds`` from now."""
        with self._lock:
            until = self._clock() + max(0.0, seconds)
            if until > self._paused_until:
                self._paused_until = until
                log.warning("fileX asked to wait %.1fs (Retry-After): every request to it waits", seconds)

    def acquire(self) -> None:
        with self._lock:
            now = self._clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
            self._last = now
            # Reserve the token now (may go negative) so waiters queue fairly without a busy loop.
            self._tokens -= 1.0
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        # A pause may have begun while this request waited for its slot: checked after, too.
        while True:
            with self._lock:
                remaining = self._paused_until - self._clock()
            if remaining <= 0:
                return
            if remaining > self.max_wait:
                raise HttpTransientError(f"fileX asked every client to wait {remaining:.0f}s more (Retry-After)",
                                         status=429, retry_after=remaining)
            self._sleep(remaining)


# --------------------------------------------------------------------------- client

def make_http_client(net: NetworkSettings, verify: bool | str = True) -> httpx.Client:
    """An httpx client with the configured timeouts; ``verify`` may be a CA bundle path."""
    ctx: bool | ssl.SSLContext = verify
    if isinstance(verify, str):
        # httpx 0.28 deprecates a path for verify=; build the context ourselves.
        ctx = ssl.create_default_context(cafile=verify)
    return httpx.Client(
        timeout=httpx.Timeout(net.read_timeout, connect=net.connect_timeout),
        verify=ctx,
        follow_redirects=False,
        headers={"User-Agent": USER_AGENT},
    )
