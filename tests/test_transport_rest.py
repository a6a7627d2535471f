"""RestTransport against a fake fileX + fake S3 behind httpx.MockTransport."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Callable

import httpx
import pytest

from filex_agent.api import FilexClient
from filex_agent.auth import FipTokenProvider
from filex_agent.errors import FilexError, PermanentError, RemoteChangedError, TransientError, UploadUnconfirmed
from filex_agent.http import RetryPolicy
from filex_agent.transports import TRANSPORTS, Transport
from filex_agent.transports.rest import RestTransport

SIG = "a5ecret5ignature0123456789"
TOKEN = "S3ssionTok3nSecret"
EXPIRED_XML = ("<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied</Code>"
               "<Message>Request has expired</Message><X-Amz-Expires>60</X-Amz-Expires></Error>")
DENIED_XML = ("<Error><Code>SignatureDoesNotMatch</Code><Message>The request signature we calculated does not "
              f"match</Message><StringToSign>X-Amz-Security-Token={TOKEN}</StringToSign></Error>")


class StreamingMockTransport(httpx.MockTransport):
    """MockTransport reads the whole request body before the handler sees it; this one lets the
    handler consume the request stream itself, so the test sees the chunks as sent."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self.handler(request)  # type: ignore[return-value]


class Fake:
    """fileX REST + S3. ``put_script``/``get_script`` queue S3 behaviours; default is success."""

    def __init__(self) -> None:
        self.url_requests: list[httpx.Request] = []
        self.puts: list[dict] = []
        self.gets: list[httpx.Request] = []
        self.put_script: list[Callable[[httpx.Request, bytes], httpx.Response] | None] = []
        self.get_script: list[Callable[[httpx.Request], httpx.Response] | None] = []
        self.tracking_status = "Request Received"
        self.tracking_calls: list[str] = []
        self.objects: dict[str, bytes] = {"out/fb.txt": os.urandom(300_000)}
        self.n = 0
        self.sleeps: list[float] = []
        # PUTs refused at connect (before any byte), PUTs whose body is cut after one chunk.
        self.refuse_connections = 0
        self.cut_bodies = 0
        self.put_hook: Callable[[], None] | None = None
        http = httpx.Client(transport=StreamingMockTransport(self.handle))
        retry = RetryPolicy(max_attempts=4, backoff_initial=0.1, backoff_max=1, sleep=self.sleeps.append)
        tokens = FipTokenProvider("https://fip.test/token", "cid", "csecret", http=http, retry=retry)
        self.api = FilexClient("https://filex.test", tokens, http=http, retry=retry)
        self.transport = RestTransport("0001", "app1", api=self.api, http=http, retry=retry, chunk_size=64 * 1024)

    def presigned(self, key: str) -> str:
        return (f"https://bucket.s3.test/{key}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Security-Token={TOKEN}"
                f"&X-Amz-Signature={SIG}{self.n}")

    def handle(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if host == "fip.test":
            return httpx.Response(200, json={"access_token": "tok", "expires_in": "3600"})
        if host == "filex.test":
            path = request.url.path
            if path == "/tracking":
                tid = request.url.params["id"]
                self.tracking_calls.append(tid)
                return httpx.Response(200, json=[{"trackingId": tid, "status": self.tracking_status}])
            parts = path.split("/")  # ['', 'files', org, app, sub, name]
            if path.startswith("/files/0001/app1/out") and len(parts) == 5:
                return httpx.Response(200, json={"name": "out", "children": [
                    {"name": "fb.txt", "type": "FILE",
                     "metadata": {"contentLength": 300000, "lastModified": "2025-08-04T07:30:34.000-04:00"}},
                    {"name": "sub", "type": "DIR"}]})
            self.n += 1
            if request.method == "PUT":
                self.url_requests.append(request)
                return httpx.Response(200, json={"url": self.presigned(f"in/{parts[5]}-{self.n}"),
                                                 "expirationTime": "2030-01-01T00:00:00Z",
                                                 "trackingId": f"trk-{self.n}"})
            return httpx.Response(200, json={"url": self.presigned(f"{parts[4]}/{parts[5]}"),
                                             "expirationTime": "2030-01-01T00:00:00Z"})
        assert host == "bucket.s3.test"
        assert "Authorization" not in request.headers  # the bearer token never goes to S3
        if request.method == "PUT":
            if self.refuse_connections:
                self.refuse_connections -= 1
                raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
            if self.cut_bodies:
                self.cut_bodies -= 1
                next(iter(request.stream))  # type: ignore[arg-type]
                raise httpx.WriteError("[Errno 104] Connection reset by peer", request=request)
            if self.put_hook is not None:
                self.put_hook()
            chunks = [bytes(c) for c in request.stream]  # type: ignore[union-attr]
            body = b"".join(chunks)
            self.puts.append({"request": request, "chunks": chunks, "body": body,
                              "stream_type": type(request.stream).__name__})
            step = self.put_script.pop(0) if self.put_script else None
            if step is not None:
                return step(request, body)
            self.objects[request.url.path.lstrip("/")] = body
            return httpx.Response(200, headers={"ETag": '"etag-1"'})
        self.gets.append(request)
        step = self.get_script.pop(0) if self.get_script else None
        if step is not None:
            return step(request)
        data = self.objects[request.url.path.lstrip("/")]
        return httpx.Response(200, content=iter([data[i:i + 50_000] for i in range(0, len(data), 50_000)]),
                              headers={"Content-Length": str(len(data))})


@pytest.fixture
def fake() -> Fake:
    return Fake()


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    p = tmp_path / "report.txt"
    p.write_bytes(os.urandom(200_000))
    return p


def _no_secret(text: str) -> None:
    assert SIG not in text and TOKEN not in text and "X-Amz-Signature=" not in text, text


def test_registered_as_rest() -> None:
    assert TRANSPORTS["rest"] is RestTransport and issubclass(RestTransport, Transport)


def test_upload_streams_file_and_keeps_tracking_id(fake: Fake, sample: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    # configure_logging() (other tests) quiets httpx; this test reads httpx's own request line.
    caplog.set_level(logging.DEBUG, logger="httpx")
    progress: list[int] = []
    result = fake.transport.upload(sample, "report.txt", progress=progress.append)
    assert result.tracking_id == "trk-1"
    assert result.size == 200_000 and result.remote_name == "report.txt"
    assert result.upload_location == "0001/app1/in"
    assert result.detail["etag"] == "etag-1"
    assert result.finished_at >= result.started_at
    [put] = fake.puts
    assert put["body"] == sample.read_bytes()
    # Streamed: several chunks of at most chunk_size, from an iterator, with an explicit length.
    assert put["stream_type"] == "IteratorByteStream"
    assert len(put["chunks"]) == 4 and max(len(c) for c in put["chunks"]) <= 64 * 1024
    assert put["request"].headers["Content-Length"] == "200000"
    assert "Transfer-Encoding" not in put["request"].headers
    assert sum(progress) == 200_000 and len(progress) == 4
    assert fake.url_requests[0].url.path == "/files/0001/app1/in/report.txt"
    for rec in caplog.records:
        _no_secret(rec.getMessage())
    assert any("bucket.s3.test" in r.getMessage() for r in caplog.records)  # httpx's line, redacted


def test_default_chunk_is_one_mib(tmp_path: Path) -> None:
    fake = Fake()
    p = tmp_path / "big.bin"
    p.write_bytes(os.urandom(2 * 1024 * 1024 + 5))
    t = RestTransport("0001", "app1", api=fake.api, http=fake.transport._http, retry=fake.transport._retry)
    t.upload(p, "big.bin")
    assert [len(c) for c in fake.puts[0]["chunks"]] == [1024 * 1024, 1024 * 1024, 5]


def test_empty_file(fake: Fake, tmp_path: Path) -> None:
    p = tmp_path / "empty.txt"
    p.write_bytes(b"")
    assert fake.transport.upload(p, "empty.txt").size == 0
    assert fake.puts[0]["body"] == b"" and fake.puts[0]["request"].headers["Content-Length"] == "0"


def test_expired_url_gets_a_new_one(fake: Fake, sample: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fake.put_script = [lambda r, b: httpx.Response(403, text=EXPIRED_XML)]
    result = fake.transport.upload(sample, "report.txt")
    assert len(fake.url_requests) == 2 and len(fake.puts) == 2
    assert result.tracking_id == "trk-2"
    assert result.detail["abandoned_tracking_ids"] == "trk-1"
    assert fake.sleeps == []  # a renewal is not a backoff
    assert any("expired" in r.getMessage() for r in caplog.records)
    for rec in caplog.records:
        _no_secret(rec.getMessage())


def test_expired_url_renewals_are_bounded(fake: Fake, sample: Path) -> None:
    fake.put_script = [lambda r, b: httpx.Response(403, text=EXPIRED_XML)] * 10
    with pytest.raises(TransientError) as ei:
        fake.transport.upload(sample, "report.txt")
    assert len(fake.url_requests) == 4  # 1 + max_url_renewals, not multiplied by the retry policy
    assert getattr(ei.value, "tracking_ids") == ["trk-1", "trk-2", "trk-3", "trk-4"]
    _no_secret(str(ei.value))


def test_other_403_is_permanent_and_secret_free(fake: Fake, sample: Path) -> None:
    fake.put_script = [lambda r, b: httpx.Response(403, text=DENIED_XML)]
    with pytest.raises(PermanentError) as ei:
        fake.transport.upload(sample, "report.txt")
    assert "SignatureDoesNotMatch" in str(ei.value)
    assert "bucket.s3.test" in str(ei.value)
    _no_secret(str(ei.value))
    assert len(fake.url_requests) == 1


def test_5xx_after_the_whole_body_is_unconfirmed_and_not_resent(fake: Fake, sample: Path) -> None:
    # S3 may have stored the object before answering 503: the transport must not file it again.
    fake.put_script = [lambda r, b: httpx.Response(503, text="<Error><Code>SlowDown</Code></Error>")]
    with pytest.raises(UploadUnconfirmed) as ei:
        fake.transport.upload(sample, "report.txt")
    assert ei.value.tracking_id == "trk-1"
    assert len(fake.puts) == 1 and len(fake.url_requests) == 1 and fake.sleeps == []
    assert fake.tracking_calls == []  # the reconciler decides, not the transport
    _no_secret(str(ei.value))


def test_connection_refused_before_any_byte_is_retried(fake: Fake, sample: Path) -> None:
    fake.refuse_connections = 2
    events: list[str] = []
    fake.transport.on_ticket = lambda t: events.append(f"ticket {t}")
    fake.transport.on_commit = lambda: events.append("commit")
    result = fake.transport.upload(sample, "report.txt")
    # Nothing reached S3 twice; the third PUT stored the file, once.
    assert len(fake.puts) == 1 and fake.puts[0]["body"] == sample.read_bytes()
    assert result.tracking_id == "trk-3" and len(fake.sleeps) == 2
    assert events == ["ticket trk-1", "commit", "ticket trk-2", "commit", "ticket trk-3", "commit"]


def test_connection_errors_retried_then_bounded(fake: Fake, sample: Path) -> None:
    fake.refuse_connections = 10
    with pytest.raises(TransientError) as ei:
        fake.transport.upload(sample, "report.txt")
    assert not isinstance(ei.value, UploadUnconfirmed)  # nothing was sent: no ambiguity
    assert len(fake.url_requests) == 4 and len(fake.sleeps) == 3 and fake.puts == []
    _no_secret(str(ei.value))
    assert ei.value.__cause__ is None or SIG not in str(ei.value.__cause__)


def test_body_cut_short_is_retried(fake: Fake, sample: Path) -> None:
    # S3 stores nothing from a body shorter than its Content-Length: sending again is safe.
    fake.cut_bodies = 1
    result = fake.transport.upload(sample, "report.txt")
    assert len(fake.puts) == 1 and result.tracking_id == "trk-2"
    assert fake.objects[fake.puts[0]["request"].url.path.lstrip("/")] == sample.read_bytes()


@pytest.mark.parametrize("error", [httpx.ReadTimeout, httpx.RemoteProtocolError, httpx.ReadError])
def test_lost_answer_after_the_whole_body_is_unconfirmed(fake: Fake, sample: Path, error: type) -> None:
    def landed_then_lost(r: httpx.Request, b: bytes) -> httpx.Response:
        fake.objects[r.url.path.lstrip("/")] = b  # S3 has it...
        raise error("lost", request=r)  # ...and the answer never came

    fake.put_script = [landed_then_lost] * 4
    with pytest.raises(UploadUnconfirmed) as ei:
        fake.transport.upload(sample, "report.txt")
    assert ei.value.tracking_id == "trk-1"
    # Exactly one PUT: the file is at S3 once, whatever tracking says later.
    assert len(fake.puts) == 1 and len(fake.url_requests) == 1 and fake.sleeps == []
    assert fake.tracking_calls == []
    assert getattr(ei.value, "tracking_ids") == ["trk-1"]
    _no_secret(str(ei.value))


def test_on_commit_comes_before_each_put_and_may_abort(fake: Fake, sample: Path) -> None:
    events: list[str] = []
    fake.put_hook = lambda: events.append("PUT")
    fake.transport.on_ticket = lambda t: events.append(f"ticket {t}")
    fake.transport.on_commit = lambda: events.append("commit")
    fake.put_script = [lambda r, b: httpx.Response(403, text=EXPIRED_XML)]
    fake.transport.upload(sample, "report.txt")
    # A refused PUT (expired URL) proves nothing landed: a new ticket, a new commit, then the PUT.
    assert events == ["ticket trk-1", "commit", "PUT", "ticket trk-2", "commit", "PUT"]

    class Fenced(Exception):
        pass

    def refuse() -> None:
        raise Fenced("the journal refused a stale writer")

    fake.transport.on_commit = refuse
    puts = len(fake.puts)
    with pytest.raises(Fenced):
        fake.transport.upload(sample, "other.txt")
    assert len(fake.puts) == puts  # nothing sent


def test_sent_sha256_is_of_the_bytes_sent(fake: Fake, sample: Path) -> None:
    import hashlib

    result = fake.transport.upload(sample, "report.txt")
    assert result.sent_sha256 == hashlib.sha256(fake.puts[0]["body"]).hexdigest()
    assert result.sent_sha256 == hashlib.sha256(sample.read_bytes()).hexdigest()


def _read_ahead_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name.startswith("rest-read")]


@pytest.mark.parametrize("read_ahead", [0, 1, 4])
def test_read_ahead_sends_and_hashes_the_same_bytes(fake: Fake, sample: Path, read_ahead: int) -> None:
    import hashlib

    fake.transport.read_ahead = read_ahead
    progress: list[int] = []
    result = fake.transport.upload(sample, "report.txt", progress=progress.append)
    [put] = fake.puts
    assert put["body"] == sample.read_bytes() and len(put["chunks"]) == 4
    assert result.sent_sha256 == hashlib.sha256(sample.read_bytes()).hexdigest()
    assert sum(progress) == 200_000
    assert _read_ahead_threads() == []


def test_read_ahead_thread_ends_with_a_body_cut_short_or_aborted(fake: Fake, sample: Path) -> None:
    # The server stops reading after one chunk: the reader, blocked on its full queue, is stopped.
    fake.transport.read_ahead = 1
    fake.cut_bodies = 1
    fake.transport.upload(sample, "report.txt")
    assert _read_ahead_threads() == []

    def grow(n: int) -> None:
        with open(sample, "ab") as f:
            f.write(b"more")

    with pytest.raises(RemoteChangedError):
        fake.transport.upload(sample, "again.txt", progress=grow)
    assert _read_ahead_threads() == []


@pytest.mark.parametrize("read_ahead", [0, 4])
def test_read_error_reaches_the_caller(fake: Fake, sample: Path, monkeypatch: pytest.MonkeyPatch,
                                       read_ahead: int) -> None:
    from filex_agent.localfile import LocalFile

    fake.transport.read_ahead = read_ahead
    real = LocalFile.pread
    calls = [0]

    def failing(self: LocalFile, n: int, offset: int) -> bytes:
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(5, "Input/output error")
        return real(self, n, offset)

    monkeypatch.setattr(LocalFile, "pread", failing)
    with pytest.raises(OSError, match="Input/output"):
        fake.transport.upload(sample, "report.txt")
    assert fake.objects.keys() == {"out/fb.txt"}
    assert _read_ahead_threads() == []


def test_symlink_is_refused(fake: Fake, sample: Path, tmp_path: Path) -> None:
    link = tmp_path / "link.txt"
    link.symlink_to(sample)
    with pytest.raises(PermanentError, match="symbolic link"):
        fake.transport.upload(link, "link.txt")
    assert fake.url_requests == [] and fake.puts == []


def test_file_changing_during_upload_aborts_without_retry(fake: Fake, sample: Path) -> None:
    def grow(n: int) -> None:
        with open(sample, "ab") as f:
            f.write(b"more")

    with pytest.raises(RemoteChangedError):
        fake.transport.upload(sample, "report.txt", progress=grow)
    # The body was cut short before its end: nothing was stored, and no retry happened.
    assert fake.objects.keys() == {"out/fb.txt"}
    assert len(fake.url_requests) == 1 and fake.sleeps == []


def test_invalid_names_and_missing_files_are_permanent(fake: Fake, sample: Path, tmp_path: Path) -> None:
    with pytest.raises(PermanentError):
        fake.transport.upload(sample, "bad#name.txt")
    with pytest.raises(PermanentError):
        fake.transport.upload(tmp_path / "missing.txt", "missing.txt")
    assert fake.url_requests == []


def test_list_feedback(fake: Fake) -> None:
    files = fake.transport.list_feedback()
    assert [(f.name, f.size) for f in files] == [("fb.txt", 300000)]
    assert files[0].modified is not None and files[0].modified.utcoffset() is not None


def test_download_writes_dest(fake: Fake, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    dest = io.BytesIO()
    progress: list[int] = []
    n = fake.transport.download_feedback("fb.txt", dest, progress=progress.append)
    assert n == 300_000 and dest.getvalue() == fake.objects["out/fb.txt"]
    assert sum(progress) == 300_000
    assert fake.gets[0].method == "GET"
    for rec in caplog.records:
        _no_secret(rec.getMessage())


def test_download_expired_url_and_truncation_retry(fake: Fake) -> None:
    data = fake.objects["out/fb.txt"]
    fake.get_script = [
        lambda r: httpx.Response(403, text=EXPIRED_XML),
        # A connection cut short: fewer bytes than announced.
        lambda r: httpx.Response(200, content=iter([data[:1000]]), headers={"Content-Length": str(len(data))}),
    ]
    dest = io.BytesIO(b"")
    assert fake.transport.download_feedback("fb.txt", dest) == len(data)
    assert dest.getvalue() == data  # the partial first try was discarded
    assert len(fake.gets) == 3 and len(fake.sleeps) == 1


def test_download_errors_are_secret_free(fake: Fake) -> None:
    fake.get_script = [lambda r: httpx.Response(404, text="<Error><Code>NoSuchKey</Code></Error>")]
    with pytest.raises(PermanentError) as ei:
        fake.transport.download_feedback("fb.txt", io.BytesIO())
    assert "NoSuchKey" in str(ei.value)
    _no_secret(str(ei.value))


def test_find_uploaded_is_none(fake: Fake) -> None:
    assert fake.transport.find_uploaded("report.txt") is None


def test_all_errors_are_filex_errors(fake: Fake, sample: Path) -> None:
    fake.put_script = [lambda r, b: httpx.Response(500)] * 10
    with pytest.raises(FilexError):
        fake.transport.upload(sample, "report.txt")


# ---------------------------------------------------------------- against a real HTTP server


@pytest.fixture
def real_s3():
    """A real HTTP server on 127.0.0.1 standing in for S3 pre-signed URLs (PUT stores, GET serves)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    store: dict[str, bytes] = {}
    seen: list[dict] = []
    # What to do after storing a PUT's body, one entry per PUT: "503" answers 503, "drop" closes
    # the connection without an answer (S3 stored it, the answer was lost).
    after: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep test output quiet
            pass

        def do_PUT(self) -> None:
            length = int(self.headers["Content-Length"])
            seen.append(dict(self.headers))
            body = b""
            while len(body) < length:
                part = self.rfile.read(min(65536, length - len(body)))
                if not part:
                    break
                body += part
            if len(body) != length:  # like S3: an incomplete body stores nothing
                return
            store[self.path.split("?")[0]] = body
            then = after.pop(0) if after else "ok"
            if then == "drop":
                self.close_connection = True
                self.connection.shutdown(2)
                return
            if then == "503":
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("ETag", '"real"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:
            data = store.get(self.path.split("?")[0])
            if data is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", store, seen, after
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _real_transport(base: str, tmp_path: Path) -> RestTransport:
    n = [0]

    def filex(request: httpx.Request) -> httpx.Response:
        if request.url.host == "fip.test":
            return httpx.Response(200, json={"access_token": "tok", "expires_in": "3600"})
        n[0] += 1
        parts = request.url.path.split("/")
        return httpx.Response(200, json={"url": f"{base}/{parts[4]}/{parts[5]}?X-Amz-Signature={SIG}",
                                         "trackingId": f"trk-{n[0]}"})

    api_http = httpx.Client(transport=httpx.MockTransport(filex))
    retry = RetryPolicy(max_attempts=2, sleep=lambda s: None)
    tokens = FipTokenProvider("https://fip.test/token", "cid", "csecret", http=api_http, retry=retry)
    api = FilexClient("https://filex.test", tokens, http=api_http, retry=retry, allow_insecure=True)  # moto: plain http
    s3_http = httpx.Client(timeout=httpx.Timeout(10.0))
    return RestTransport("0001", "app1", api=api, http=s3_http, retry=retry)


def test_real_server_upload_and_download(real_s3, tmp_path: Path) -> None:
    base, store, seen, _after = real_s3
    t = _real_transport(base, tmp_path)
    p = tmp_path / "real.bin"
    p.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    result = t.upload(p, "real.bin")
    assert result.tracking_id == "trk-1" and result.detail["etag"] == "real"
    assert store["/in/real.bin"] == p.read_bytes()
    assert seen[0]["Content-Length"] == str(p.stat().st_size)
    assert "Transfer-Encoding" not in seen[0]
    store["/out/real.bin"] = store["/in/real.bin"]
    dest = io.BytesIO()
    assert t.download_feedback("real.bin", dest) == p.stat().st_size
    assert dest.getvalue() == p.read_bytes()


def test_real_server_file_change_stores_nothing(real_s3, tmp_path: Path) -> None:
    base, store, seen, _after = real_s3
    t = _real_transport(base, tmp_path)
    p = tmp_path / "changing.bin"
    p.write_bytes(os.urandom(3 * 1024 * 1024))

    def grow(n: int) -> None:
        with open(p, "ab") as f:
            f.write(b"x")

    with pytest.raises(RemoteChangedError):
        t.upload(p, "changing.bin", progress=grow)
    assert "/in/changing.bin" not in store


@pytest.mark.parametrize("then", ["503", "drop"])
def test_real_server_stored_then_answer_lost_is_sent_once(real_s3, tmp_path: Path, then: str) -> None:
    base, store, seen, after = real_s3
    after.append(then)
    t = _real_transport(base, tmp_path)
    commits: list[int] = []
    t.on_commit = lambda: commits.append(len(seen))
    p = tmp_path / "lost.bin"
    p.write_bytes(os.urandom(1024 * 1024 + 3))
    with pytest.raises(UploadUnconfirmed) as ei:
        t.upload(p, "lost.bin")
    assert ei.value.tracking_id == "trk-1"
    assert len(seen) == 1 and store["/in/lost.bin"] == p.read_bytes()  # one PUT, stored whole
    assert commits == [0]  # called once, before that PUT
