"""Run the status page under uvicorn in a thread of the agent (started and stopped by the service).

The socket is bound by ``start()`` in the caller's thread, so a port in use is an error there
and ``url`` is known before anything is printed.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn

from filex_agent.config import WebSettings, is_loopback
from filex_agent.web.app import Sources, create_app
from filex_agent.web.auth import Authenticator
from filex_agent.web.views import Charts

log = logging.getLogger(__name__)


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def authenticator(settings: WebSettings) -> Authenticator | None:
    """Resolve the secret references (a missing secret is a ConfigError naming it)."""
    from filex_agent.logging_setup import register_secret

    token = settings.token.resolve() if settings.token else None
    register_secret(token)
    pw_hash = settings.password_hash.resolve() if settings.password_hash else None
    register_secret(pw_hash)
    if not token and not pw_hash:
        return None
    return Authenticator(token=token, password_hash=pw_hash, username=settings.username)


class WebServer:
    def __init__(self, settings: WebSettings, sources: Sources, auth: Authenticator | None = None):
        self.settings = settings
        self.host, self.port = split_listen(settings.listen)
        allowed = None
        if is_loopback(self.host):
            # Loopback without authentication: refuse other Host names, so a hostile web page
            # cannot read the status through DNS rebinding.
            allowed = {"localhost", "127.0.0.1", "::1", self.host.lower()}
        self.tls = settings.tls_cert is not None
        self.charts = Charts(sources.store)
        self.app = create_app(sources, auth=auth, allowed_hosts=allowed, refresh_seconds=settings.refresh_seconds,
                              hsts=self.tls, chart_data=self.charts)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.warm_thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/"

    def start(self, timeout: float = 10.0) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # proto=IPPROTO_TCP: asyncio then sets TCP_NODELAY on each connection (with proto 0 it
        # does not, and a keep-alive answer waited 40 ms for the client's delayed ACK).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        sock.listen(64)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, log_config=None, log_level="warning", access_log=False, lifespan="off", server_header=False,
            date_header=True, timeout_keep_alive=5, limit_concurrency=64,
            ssl_certfile=str(self.settings.tls_cert) if self.settings.tls_cert else None,
            ssl_keyfile=str(self.settings.tls_key) if self.settings.tls_key else None)
        try:
            config.load()  # here, not in the thread: a bad certificate or key is an error of start()
        except BaseException:
            sock.close()
            raise
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="web-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise OSError(f"status page on {self.settings.listen} did not start")
            time.sleep(0.02)
        log.info("status page at %s", self.url)
        # 30 days of both charts, read once in the background rather than by the first visitor.
        self.warm_thread = threading.Thread(target=self._warm, name="web-charts", daemon=True)
        self.warm_thread.start()

    def _warm(self) -> None:
        try:
            self.charts.warm()
        except Exception as exc:  # noqa: BLE001 - the page computes them itself when asked
            log.debug("chart warm-up: %s", exc)

    def stop(self, timeout: float = 5.0) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.should_exit = True
        if thread is not None:
            thread.join(timeout)
        if self.warm_thread is not None:
            self.warm_thread.join(timeout)
