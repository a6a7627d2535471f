"""FilexClient against an httpx.MockTransport fileX; also the shared http.py policy pieces."""

from __future__ import annotations

import threading
from email.utils import format_datetime
from datetime import datetime, timedelta, timezone
from typing import Callable

import httpx
import pytest

from filex_agent.api import FilexClient
from filex_agent.auth import FipTokenProvider
from filex_agent.errors import AuthError, NotEntitledError, PermanentError, TransientError
from filex_agent.config import NetworkSettings
from filex_agent.http import (
    HttpTransientError,
    make_http_client,
    RateLimiter,
    RetryPolicy,
    parse_retry_after,
    raise_for_status,
    redact_url,
)

BASE = "https://filex.test"
TOKEN_URL = "https://fip.test/token"

LISTING = {"name": "out", "type": "DIR", "metadata": {"writable": False},
           "children": [{"name": "a.txt", "type": "FILE", "metadata": {"contentLength": 3}}],
           "_links": {"self": [{"href": f"{BASE}/files/0001/app1/out"}]}}
PRESIGNED = {"url": "https://bucket.s3.test/k?X-Amz-Signature=abc", "expirationTime": "2025-08-23T10:08:42.244-04:00",
             "trackingId": "trk-1"}
TRACKING = [{"trackingId": "trk-1", "submissionTime": None, "status": "Request Received", "downstreamStatus": None,
             "_links": [{"rel": "self", "href": f"{BASE}/tracking?id=trk-1"}]}]
S3TOK = {"region": "us-east-1", "sessionName": "s", "readPaths": ["b/0001/app1/out/"],
         "writePaths": ["b/0001/app1/in/"],
         "credentials": {"accessKeyId": "ASIA", "secretAccessKey": "sk", "sessionToken": "st",
                         "expiration": "2025-08-22T17:29:58.000-04:00"}}

Handler = Callable[[httpx.Request], httpx.Response]


class Env:
    """A fake FIP + fileX behind one MockTransport; ``script`` queues responses for fileX."""

    def __init__(self, default: Handler | None = None):
        self.fip_calls = 0
        self.requests: list[httpx.Request] = []
        self.script: list[httpx.Response] = []
        self.default = default or (lambda r: httpx.Response(200, json=LISTING))
        self.sleeps: list[float] = []
        http = httpx.Client(transport=httpx.MockTransport(self.handle))
        self.retry = RetryPolicy(max_attempts=4, backoff_initial=0.25, backoff_max=8, sleep=self.sleeps.append)
        self.tokens = FipTokenProvider(TOKEN_URL, "cid", "csecret", http=http, retry=self.retry)
        self.client = FilexClient(BASE + "/", self.tokens, http=http, retry=self.retry)

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "fip.test":
            self.fip_calls += 1
            return httpx.Response(200, json={"access_token": f"tok{self.fip_calls}", "expires_in": "43170"})
        self.requests.append(request)
        if self.script:
            return self.script.pop(0)
        return self.default(request)


@pytest.fixture
def env() -> Env:
    return Env()


def test_endpoints_urls_methods_headers() -> None:
    def route(r: httpx.Request) -> httpx.Response:
        path = r.url.raw_path.decode()
        if path.startswith("/tracking"):
            return httpx.Response(200, json=TRACKING)
        if path.startswith("/S3TransferTokens"):
            return httpx.Response(200, json=S3TOK)
        if path.count("/") >= 5 or r.method == "PUT":
            return httpx.Response(200, json=PRESIGNED)
        return httpx.Response(200, json=LISTING)

    e = Env(route)
    c = e.client
    assert c.applications("0001").name == "out"
    c.subspaces("0001", "app1")
    assert c.list_files("0001", "app1", "out").children[0].is_file
    assert c.download_url("0001", "app1", "out", "a b#c.txt").trackingId == "trk-1"
    assert c.upload_url("0001", "app1", "new@file,1.zip", metadata={"InternalReference": "ref-1"}).url
    assert c.tracking("trk-1")[0].status == "Request Received"
    assert c.tracking()[0].trackingId == "trk-1"
    assert c.s3_transfer_tokens("0001", "app1").credentials.accessKeyId == "ASIA"

    got = [(r.method, r.url.raw_path.decode()) for r in e.requests]
    assert got == [
        ("GET", "/files/0001"),
        ("GET", "/files/0001/app1"),
        ("GET", "/files/0001/app1/out"),
        ("GET", "/files/0001/app1/out/a%20b%23c.txt"),
        ("PUT", "/files/0001/app1/in/new@file,1.zip"),
        ("GET", "/tracking?id=trk-1"),
        ("GET", "/tracking"),
        ("GET", "/S3TransferTokens/0001/app1"),
    ]
    for r in e.requests:
        assert r.url.host == "filex.test"
        assert r.headers["Authorization"] == "Bearer tok1"
        assert r.headers["Accept"] == "application/json"
    assert e.requests[4].headers["filex-InternalReference"] == "ref-1"
    assert e.fip_calls == 1


@pytest.mark.parametrize("bad", ["..", ".", "", "a/b"])
def test_bad_path_segments_rejected_before_network(env: Env, bad: str) -> None:
    with pytest.raises(PermanentError):
        env.client.download_url("0001", "app1", "out", bad)
    assert env.requests == []


def test_bad_metadata_rejected(env: Env) -> None:
    with pytest.raises(PermanentError):
        env.client.upload_url("0001", "app1", "x.txt", metadata={"bad name": "v"})
    with pytest.raises(PermanentError):
        env.client.upload_url("0001", "app1", "x.txt", metadata={"Ref": "line\r\nInjected: 1"})
    assert env.requests == []


def test_401_once_refetches_token_and_retries_once(env: Env) -> None:
    env.script = [httpx.Response(401, json={"message": "token expired"})]
    assert env.client.list_files("0001", "app1", "out").name == "out"
    assert [r.headers["Authorization"] for r in env.requests] == ["Bearer tok1", "Bearer tok2"]
    assert env.fip_calls == 2
    assert env.sleeps == []


def test_401_twice_is_auth_error(env: Env) -> None:
    env.script = [httpx.Response(401), httpx.Response(401), httpx.Response(200, json=LISTING)]
    with pytest.raises(AuthError):
        env.client.list_files("0001", "app1", "out")
    assert len(env.requests) == 2
    assert env.fip_calls == 2


def test_403_not_entitled_not_retried(env: Env) -> None:
    env.script = [httpx.Response(403, json={"message": "not entitled to org 0002"})]
    with pytest.raises(NotEntitledError) as ei:
        env.client.applications("0002")
    assert "403" in str(ei.value) and "not entitled to org 0002" in str(ei.value)
    assert len(env.requests) == 1


@pytest.mark.parametrize("status", [400, 404, 409, 422])
def test_client_errors_are_permanent(env: Env, status: int) -> None:
    env.script = [httpx.Response(status, text="nope")]
    with pytest.raises(PermanentError) as ei:
        env.client.tracking("x")
    assert not isinstance(ei.value, AuthError)
    assert len(env.requests) == 1


def test_503_retry_after_honoured(env: Env) -> None:
    env.script = [httpx.Response(503, headers={"Retry-After": "2"}, text="busy")]
    assert env.client.list_files("0001", "app1", "out").name == "out"
    assert len(env.requests) == 2
    assert len(env.sleeps) == 1 and env.sleeps[0] >= 2


def test_429_retry_after_http_date() -> None:
    when = datetime.now(timezone.utc) + timedelta(seconds=5)
    secs = parse_retry_after(format_datetime(when, usegmt=True))
    assert secs is not None and 3.5 <= secs <= 5.0
    assert parse_retry_after("garbage") is None
    assert parse_retry_after(None) is None


def test_retry_after_longer_than_backoff_max_gives_up_at_once(env: Env) -> None:
    env.script = [httpx.Response(429, headers={"Retry-After": "3600"})]
    with pytest.raises(TransientError) as ei:
        env.client.tracking()
    assert getattr(ei.value, "retry_after") == 3600
    assert env.sleeps == [] and len(env.requests) == 1


def test_attempts_are_bounded(env: Env) -> None:
    env.default = lambda r: httpx.Response(500, text="boom")
    with pytest.raises(TransientError) as ei:
        env.client.list_files("0001", "app1", "out")
    assert len(env.requests) == 4
    assert len(env.sleeps) == 3
    assert "500" in str(ei.value)


def test_connection_errors_are_transient_and_retried(env: Env) -> None:
    calls = []

    def flaky(r: httpx.Request) -> httpx.Response:
        calls.append(r)
        if len(calls) < 3:
            raise httpx.ConnectError("connection refused")
        return httpx.Response(200, json=LISTING)

    env.default = flaky
    assert env.client.applications("0001").name == "out"
    assert len(calls) == 3


@pytest.mark.parametrize("body", ["<html>Service maintenance</html>", '{"unexpected": true}', "[1, 2]"])
def test_garbage_json_is_permanent(env: Env, body: str) -> None:
    env.default = lambda r: httpx.Response(200, text=body)
    with pytest.raises(PermanentError) as ei:
        env.client.list_files("0001", "app1", "out")
    assert "unexpected response from fileX" in str(ei.value)
    assert len(env.requests) == 1


def test_shape_error_never_echoes_values(env: Env) -> None:
    bad = dict(S3TOK, credentials={"accessKeyId": "ASIA", "secretAccessKey": "TopSecretKey0123456789"})
    env.default = lambda r: httpx.Response(200, json=bad)
    with pytest.raises(PermanentError) as ei:
        env.client.s3_transfer_tokens("0001", "app1")
    assert "TopSecretKey" not in str(ei.value)
    assert "credentials.sessionToken" in str(ei.value)


def test_tracking_single_object_tolerated(env: Env) -> None:
    env.default = lambda r: httpx.Response(200, json=TRACKING[0])
    assert [t.trackingId for t in env.client.tracking("trk-1")] == ["trk-1"]
    env.default = lambda r: httpx.Response(200, json=[])
    assert env.client.tracking() == []


def test_rate_limiter_bounds_request_rate() -> None:
    t = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        t[0] += s

    limiter = RateLimiter(20, clock=lambda: t[0], sleep=sleep)
    stamps = []
    e = Env()
    e.client = FilexClient(BASE, e.tokens, http=httpx.Client(transport=httpx.MockTransport(
        lambda r: (stamps.append(t[0]), e.handle(r))[1])), retry=e.retry, limiter=limiter)
    for _ in range(60):
        e.client.applications("0001")
    fileX = stamps  # FIP's token call does not go through the limiter
    assert len(fileX) == 60
    # 60 requests at 20/s take >= 59 * 50 ms; no 1 s window holds more than 21.
    assert fileX[-1] - fileX[0] >= 2.95 - 1e-9
    for i, s in enumerate(fileX):
        assert sum(1 for x in fileX[i:] if x < s + 1.0) <= 21


def test_rate_limiter_burst_and_threads() -> None:
    waits: list[float] = []
    # The clock stands still: every waiter must queue behind the reservations before it.
    limiter = RateLimiter(10, burst=5, clock=lambda: 0.0, sleep=waits.append)
    threads = [threading.Thread(target=limiter.acquire) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(5)
    # 5 from the burst, then 3 reserved at 0.1, 0.2, 0.3 s.
    assert sorted(round(w, 6) for w in waits) == [0.1, 0.2, 0.3]


def test_raise_for_status_mapping_and_excerpt() -> None:
    req = httpx.Request("PUT", "https://b.s3.test/k?X-Amz-Signature=deadbeef&X-Amz-Security-Token=SESSION")

    def resp(status: int, text: str = "", headers: dict[str, str] | None = None) -> httpx.Response:
        return httpx.Response(status, text=text, headers=headers, request=req)

    cases = {401: AuthError, 403: NotEntitledError, 404: PermanentError, 400: PermanentError,
             409: PermanentError, 422: PermanentError, 429: TransientError, 500: TransientError,
             502: TransientError, 503: TransientError, 504: TransientError}
    for status, cls in cases.items():
        with pytest.raises(cls):
            raise_for_status(resp(status), "op")
    raise_for_status(resp(200), "op")
    raise_for_status(resp(204), "op")
    with pytest.raises(HttpTransientError) as ei:
        raise_for_status(resp(429, headers={"Retry-After": "7"}), "op")
    assert ei.value.retry_after == 7.0 and ei.value.status == 429
    with pytest.raises(HttpTransientError) as ei:
        raise_for_status(resp(503), "op")
    assert ei.value.retry_after is None

    s3_xml = ("<?xml version='1.0'?><Error><Code>SignatureDoesNotMatch</Code><Message>The request signature we "
              "calculated does not match</Message><StringToSign>AWS4-HMAC-SHA256 X-Amz-Security-Token=SESSION"
              "</StringToSign><CanonicalRequest>PUT /k X-Amz-Signature=deadbeef</CanonicalRequest></Error>")
    with pytest.raises(PermanentError) as ei:
        raise_for_status(resp(400, s3_xml), "upload")
    msg = str(ei.value)
    assert msg.startswith("upload: HTTP 400 SignatureDoesNotMatch: The request signature")
    assert "SESSION" not in msg and "deadbeef" not in msg
    long_body = "x " * 5000 + "https://b.s3.test/k?X-Amz-Signature=deadbeef"
    with pytest.raises(TransientError) as ei:
        raise_for_status(resp(500, long_body), "op")
    assert len(str(ei.value)) < 200
    with pytest.raises(TransientError) as ei:
        raise_for_status(resp(502, "see https://b.s3.test/k?X-Amz-Signature=deadbeef now"), "op")
    assert "deadbeef" not in str(ei.value) and "https://b.s3.test/k?<redacted>" in str(ei.value)


def test_redact_url() -> None:
    assert redact_url("https://b.s3.test/a/k.txt?X-Amz-Signature=x&y=z") == "https://b.s3.test/a/k.txt?<redacted>"
    assert redact_url("https://filex.test/files/0001") == "https://filex.test/files/0001"
    assert "sig" not in redact_url(httpx.URL("https://h/p?sig=1"))


def test_retry_policy_backoff_full_jitter_capped() -> None:
    sleeps: list[float] = []
    seen: list[tuple[float, float]] = []

    def jitter(lo: float, hi: float) -> float:
        seen.append((lo, hi))
        return hi

    retries: list[str] = []
    policy = RetryPolicy(max_attempts=6, backoff_initial=1, backoff_max=5, sleep=sleeps.append,
                         on_retry=retries.append, jitter=jitter)
    attempts = []

    def fn() -> str:
        attempts.append(1)
        if len(attempts) < 6:
            raise TransientError("again")
        return "done"

    assert policy.call("op", fn) == "done"
    assert sleeps == [1, 2, 4, 5, 5]
    assert all(lo == 0 for lo, _ in seen)
    assert retries == ["op"] * 5


def test_retry_policy_permanent_at_once_and_no_nested_multiplication() -> None:
    sleeps: list[float] = []
    policy = RetryPolicy(max_attempts=3, sleep=sleeps.append, jitter=lambda lo, hi: 0.0)
    n = [0]

    def permanent() -> None:
        n[0] += 1
        raise PermanentError("no")

    with pytest.raises(PermanentError):
        policy.call("op", permanent)
    assert n[0] == 1

    inner_calls = [0]

    def inner() -> None:
        inner_calls[0] += 1
        raise TransientError("down")

    with pytest.raises(TransientError):
        policy.call("outer", lambda: policy.call("inner", inner))
    assert inner_calls[0] == 3  # not 9



def test_make_http_client_timeouts(tmp_path) -> None:
    net = NetworkSettings(connect_timeout=3, read_timeout=7)
    with make_http_client(net) as c:
        assert c.timeout.connect == 3 and c.timeout.read == 7
        assert c.follow_redirects is False
    import ssl
    ca = ssl.get_default_verify_paths().cafile
    if ca:
        with make_http_client(net, verify=ca) as c:
            assert c.timeout.read == 7
    with pytest.raises((FileNotFoundError, OSError)):
        make_http_client(net, verify=str(tmp_path / "missing.pem"))
