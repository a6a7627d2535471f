"""Prometheus metrics and the /metrics, /healthz, /readyz endpoint.

Each ``Metrics`` owns its ``CollectorRegistry`` (never the process-global one), so several
agents or tests in one process do not collide.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger(__name__)

OUTCOMES = ("submitted", "accepted", "rejected", "partially_rejected", "failed", "held")

# Uploads range from a few KB (seconds) to 5 GB (tens of minutes).
_UPLOAD_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
# Drop to submitted includes stability wait and queueing: seconds to hours.
LATENCY_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.submissions_total = Counter(
            "filex_submissions_total", "Submissions by outcome", ["route", "transport", "outcome"], registry=r)
        self.bytes_sent_total = Counter(
            "filex_bytes_sent_total", "Bytes uploaded to fileX", ["route", "transport"], registry=r)
        self.upload_seconds = Histogram(
            "filex_upload_seconds", "Duration of one upload", ["route", "transport"],
            buckets=_UPLOAD_BUCKETS, registry=r)
        self.drop_to_submitted_seconds = Histogram(
            "filex_drop_to_submitted_seconds", "From file detected in the outbox to upload complete",
            ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("filex_queue_depth", "Files waiting to be uploaded", ["route"], registry=r)
        self.retries_total = Counter("filex_retries_total", "Retried operations", ["operation"], registry=r)
        self.token_refreshes_total = Counter(
            "filex_token_refreshes_total", "Credential refreshes (fip, s3)", ["kind"], registry=r)
        self.last_tracking_poll_success = Gauge(
            "filex_last_tracking_poll_success_timestamp_seconds",
            "Unix time of the last successful tracking poll", registry=r)
        self.calendar_occurrences = Gauge(
            "filex_calendar_occurrences", "Filing-calendar occurrences open or under way, by state",
            ["expectation", "state"], registry=r)
        self.calendar_next_deadline = Gauge(
            "filex_calendar_next_deadline_timestamp_seconds", "Unix time of the next deadline of an expectation",
            ["expectation"], registry=r)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, host: str = "127.0.0.1", port: int = 0,
              health: Callable[[], bool] = lambda: True,
              ready: Callable[[], bool] = lambda: True) -> None:
        """Serve /metrics, /healthz and /readyz on a background thread; ``self.port`` is the bound port."""
        if self._server is not None:
            raise RuntimeError("metrics server already running")
        handler = _make_handler(self, health, ready)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET

        class _Server(ThreadingHTTPServer):
            address_family = family
            daemon_threads = True  # a stuck scraper must not block shutdown

        self._server = _Server((host, port), handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="metrics-http", daemon=True)
        self._thread.start()
        log.info("metrics listening on %s:%d", host, self.port)

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)


def parse_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:9464"`` / ``"[::1]:9464"`` → (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"expected host:port, got {listen!r}")
    return host.strip("[]"), int(port)


def _make_handler(metrics: Metrics, health: Callable[[], bool],
                  ready: Callable[[], bool]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = 10  # slow clients cannot hold a thread forever
        server_version = "filex-agent"
        sys_version = ""

        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, metrics.render(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._probe(health)
            elif path == "/readyz":
                self._probe(ready)
            else:
                self._send(404, b"not found\n")

        def _probe(self, check: Callable[[], bool]) -> None:
            try:
                ok = bool(check())
            except Exception:
                log.exception("health check raised")
                ok = False
            self._send(200, b"ok\n") if ok else self._send(503, b"unavailable\n")

        def _send(self, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            log.debug("metrics http: " + format, *args)

    return Handler
