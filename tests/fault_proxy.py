"""A tiny HTTP proxy on 127.0.0.1 in front of a real server (moto, an S3 stand-in) that injects
the faults a client cannot tell apart: the request was refused, or it HAPPENED and the answer
was lost (a 503 after the server stored it, the connection closed instead of the answer).

``faults`` is a list of ``(match, action)``; the first entry whose ``match(method, path, query)``
is true is used once and removed. Actions:

- ``"store_then_503"``: forward, discard the real answer, answer 503 SlowDown.
- ``"store_then_drop"``: forward, then close the connection without an answer.
- ``"refuse_503"``: do not forward; answer 503 (nothing stored).
- ``"refuse_400_timeout"``: do not forward; S3's 400 RequestTimeout (nothing stored).
- ``"reset_mid_body"``: read half the body, then reset the connection (nothing stored).

``seen`` records every request forwarded (method, path, query) for "sent exactly once" asserts.
"""

from __future__ import annotations

import http.client
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs, urlsplit

Match = Callable[[str, str, dict[str, list[str]]], bool]

SLOWDOWN = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
REQUEST_TIMEOUT = (b"<Error><Code>RequestTimeout</Code><Message>Your socket connection to the server was not "
                   b"read from or written to within the timeout period.</Message></Error>")


def put_object(method: str, path: str, q: dict[str, list[str]]) -> bool:
    return method == "PUT" and "partNumber" not in q and "uploadId" not in q and "/in/" in path


def upload_part(method: str, path: str, q: dict[str, list[str]]) -> bool:
    return method == "PUT" and "partNumber" in q


def complete_multipart(method: str, path: str, q: dict[str, list[str]]) -> bool:
    return method == "POST" and "uploadId" in q


class FaultProxy:
    def __init__(self, upstream: str):
        up = urlsplit(upstream)
        self.upstream_host = up.hostname or "127.0.0.1"
        self.upstream_port = up.port or 80
        self.faults: list[tuple[Match, str]] = []
        self.seen: list[tuple[str, str, dict[str, list[str]]]] = []
        self.injected: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                proxy._serve(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def count(self, match: Match) -> int:
        with self._lock:
            return sum(1 for m, p, q in self.seen if match(m, p, q))

    def _take(self, method: str, path: str, q: dict[str, list[str]]) -> str | None:
        with self._lock:
            for i, (match, action) in enumerate(self.faults):
                if match(method, path, q):
                    del self.faults[i]
                    self.injected.append((method, action))
                    return action
        return None

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        split = urlsplit(h.path)
        q = parse_qs(split.query, keep_blank_values=True)
        length = int(h.headers.get("Content-Length") or 0)
        action = self._take(h.command, split.path, q)
        if action == "reset_mid_body":
            h.rfile.read(length // 2)
            h.close_connection = True
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            h.connection.close()  # RST: the client is cut off mid-body
            return None
        body = h.rfile.read(length) if length else b""
        if action == "refuse_503":
            return _answer(h, 503, SLOWDOWN)
        if action == "refuse_400_timeout":
            return _answer(h, 400, REQUEST_TIMEOUT)
        with self._lock:
            self.seen.append((h.command, split.path, q))
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=60)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in ("expect", "connection")}
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if action == "store_then_drop":
            h.close_connection = True
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return None
        if action == "store_then_503":
            return _answer(h, 503, SLOWDOWN)
        h.send_response(resp.status)
        for k, v in resp.getheaders():
            # A HEAD's Content-Length is the object's size: passed through as is.
            if k.lower() not in ("transfer-encoding", "connection", "server", "date") and (
                    k.lower() != "content-length" or h.command == "HEAD"):
                h.send_header(k, v)
        if h.command != "HEAD":
            h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)
        return None


def _answer(h: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
    h.send_response(status)
    h.send_header("Content-Type", "application/xml")
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)
