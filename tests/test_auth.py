from __future__ import annotations

import base64
import threading
import time

import httpx
import pytest

from filex_agent.auth import FipTokenProvider
from filex_agent.errors import AuthError, TransientError
from filex_agent.http import RetryPolicy

TOKEN_URL = "https://fip.test/fip/rest/ews/oauth2/access_token"
SECRET = "s3cr3t-Client-Secret-value"


class FakeFip:
    def __init__(self, expires_in: str = "43170", statuses: list[int] | None = None, delay: float = 0.0):
        self.requests: list[httpx.Request] = []
        self.expires_in = expires_in
        self.statuses = list(statuses or [])
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.requests.append(request)
            n = len(self.requests)
            status = self.statuses.pop(0) if self.statuses else 200
        if self.delay:
            time.sleep(self.delay)
        if status != 200:
            return httpx.Response(status, json={"error": "invalid_client", "error_description": "bad credentials"})
        return httpx.Response(200, json={"access_token": f"tok-{n}", "scope": "any", "token_type": "Bearer",
                                         "expires_in": self.expires_in})


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def provider(fip: FakeFip, clock: Clock | None = None, sleeps: list[float] | None = None,
             **kw: float) -> FipTokenProvider:
    http = httpx.Client(transport=httpx.MockTransport(fip))
    sleeps = sleeps if sleeps is not None else []
    retry = RetryPolicy(max_attempts=3, backoff_initial=0.5, backoff_max=4, sleep=sleeps.append)
    return FipTokenProvider(TOKEN_URL, "client-1", SECRET, http=http, retry=retry, clock=clock or Clock(), **kw)


def test_request_shape_and_string_expires_in() -> None:
    fip = FakeFip(expires_in="43170")
    clock = Clock()
    p = provider(fip, clock)
    assert p.token() == "tok-1"
    req = fip.requests[0]
    assert req.method == "POST"
    assert req.url.path == "/fip/rest/ews/oauth2/access_token"
    assert req.url.params["grant_type"] == "client_credentials"
    expected = base64.b64encode(f"client-1:{SECRET}".encode()).decode()
    assert req.headers["Authorization"] == f"Basic {expected}"
    # 43170 s - 120 s margin > 1800 s cap: cached exactly 30 minutes.
    clock.now += 1799
    assert p.token() == "tok-1"
    clock.now += 2
    assert p.token() == "tok-2"
    assert p.refreshes == 2


def test_many_calls_one_post() -> None:
    fip = FakeFip()
    p = provider(fip)
    assert {p.token() for _ in range(50)} == {"tok-1"}
    assert len(fip.requests) == 1
    assert p.refreshes == 1


def test_refresh_before_expiry_uses_margin() -> None:
    fip = FakeFip(expires_in="600")
    clock = Clock()
    p = provider(fip, clock, refresh_margin=120)
    assert p.token() == "tok-1"
    clock.now += 479  # 600 - 120 = 480 s of use
    assert p.token() == "tok-1"
    clock.now += 2
    assert p.token() == "tok-2"


def test_short_lived_token_still_cached_a_little() -> None:
    fip = FakeFip(expires_in="60")
    clock = Clock()
    p = provider(fip, clock, refresh_margin=120)
    p.token()
    clock.now += 29
    p.token()
    assert len(fip.requests) == 1
    clock.now += 2
    p.token()
    assert len(fip.requests) == 2


def test_concurrent_callers_trigger_one_fetch() -> None:
    fip = FakeFip(delay=0.2)
    p = provider(fip)
    barrier = threading.Barrier(8)
    got: list[str] = []

    def worker() -> None:
        barrier.wait()
        got.append(p.token())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert got == ["tok-1"] * 8
    assert len(fip.requests) == 1


@pytest.mark.parametrize("status", [400, 401, 403])
def test_bad_credentials_auth_error_without_secret(status: int) -> None:
    fip = FakeFip(statuses=[status])
    sleeps: list[float] = []
    p = provider(fip, sleeps=sleeps)
    with pytest.raises(AuthError) as ei:
        p.token()
    msg = str(ei.value)
    assert str(status) in msg and "client-1" in msg
    assert SECRET not in msg
    assert base64.b64encode(f"client-1:{SECRET}".encode()).decode() not in msg
    assert len(fip.requests) == 1 and sleeps == []  # permanent: not retried


def test_repr_has_no_secret() -> None:
    p = provider(FakeFip())
    p.token()
    text = repr(p) + str(p)
    assert SECRET not in text and "tok-1" not in text and "Basic" not in text
    assert "client-1" in text


def test_invalidate_then_refetch() -> None:
    fip = FakeFip()
    p = provider(fip)
    t1 = p.token()
    p.invalidate("some-older-token")  # not the cached one: kept
    assert p.token() == t1
    p.invalidate(t1)
    assert p.token() == "tok-2"
    assert p.refreshes == 2


def test_5xx_retried_then_succeeds() -> None:
    fip = FakeFip(statuses=[503, 502])
    sleeps: list[float] = []
    p = provider(fip, sleeps=sleeps)
    assert p.token() == "tok-3"
    assert len(fip.requests) == 3
    assert len(sleeps) == 2


def test_5xx_bounded() -> None:
    fip = FakeFip(statuses=[500] * 10)
    p = provider(fip)
    with pytest.raises(TransientError):
        p.token()
    assert len(fip.requests) == 3


def test_garbage_body_is_permanent_and_not_echoed() -> None:
    http = httpx.Client(transport=httpx.MockTransport(
        lambda r: httpx.Response(200, text='{"token": "leaky-value-123"}')))
    p = FipTokenProvider(TOKEN_URL, "client-1", SECRET, http=http, retry=RetryPolicy(sleep=lambda s: None))
    from filex_agent.errors import PermanentError
    with pytest.raises(PermanentError) as ei:
        p.token()
    assert "leaky-value-123" not in str(ei.value)
