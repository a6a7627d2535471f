"""Shared clients, one per credential, and the transports built on them.

Tokens, S3 credentials and SSH connections are per credential and shared across routes and
worker threads; transports are cheap views bound to one (org, application).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Callable, Iterator

import httpx

from filex_agent.config import Config, CredentialSettings, RouteSettings
from filex_agent.errors import ConfigError
from filex_agent.transports import Transport

log = logging.getLogger(__name__)


def resolve(value: str | None) -> str | None:
    """client_id may be literal or a reference; secrets are always references."""
    from filex_agent.config import SecretRef

    if value is None:
        return None
    if isinstance(value, SecretRef) or str(value).startswith(SecretRef.SCHEMES):
        secret = SecretRef(value).resolve()
        _register_secret(secret)
        return secret
    return str(value)


def _register_secret(secret: str) -> None:
    try:
        from filex_agent.logging_setup import register_secret
    except ImportError:  # pragma: no cover - logging module not present
        return
    register_secret(secret)


class Connections:
    def __init__(self, config: Config, *, on_retry: Callable[[str], None] | None = None):
        from filex_agent.http import RateLimiter, RetryPolicy, make_http_client

        self.config = config
        net = config.network
        env = config.environment
        verify: bool | str = str(env.ca_bundle) if env.ca_bundle else env.verify_tls
        self.verify = verify
        self.http: httpx.Client = make_http_client(net, verify=verify)
        self.retry = RetryPolicy(net.max_attempts, net.backoff_initial, net.backoff_max, on_retry=on_retry)
        # One limiter for the fileX API host, shared by every credential and worker; a pause
        # longer than backoff_max reschedules the work instead of holding a worker.
        self.limiter = RateLimiter(net.rate_limit_per_second, max_wait=net.backoff_max)
        self._lock = threading.Lock()
        self._tokens: dict[str, object] = {}
        self._apis: dict[str, object] = {}
        self._s3_tokens: dict[str, object] = {}
        self._sftp: dict[str, object] = {}
        # Transports costly to build, shared by all workers: (kind, credential, org, app).
        self._shared: dict[tuple[str, str, str, str], Transport] = {}

    def credential(self, name: str) -> CredentialSettings:
        try:
            return self.config.credentials[name]
        except KeyError:
            raise ConfigError(f"credentials.{name}", "no such credential") from None

    def has_api(self, credential: str) -> bool:
        c = self.credential(credential)
        return bool(c.client_id and c.client_secret)

    def tokens(self, credential: str):
        from filex_agent.auth import FipTokenProvider

        with self._lock:
            if credential not in self._tokens:
                c = self.credential(credential)
                if not (c.client_id and c.client_secret):
                    raise ConfigError(f"credentials.{credential}", "client_id and client_secret are needed for the fileX API")
                self._tokens[credential] = FipTokenProvider(
                    self.config.environment.fip_token_url, resolve(c.client_id), resolve(c.client_secret),
                    http=self.http, retry=self.retry)
            return self._tokens[credential]

    def api(self, credential: str):
        from filex_agent.api import FilexClient

        tokens = self.tokens(credential)
        with self._lock:
            if credential not in self._apis:
                self._apis[credential] = FilexClient(
                    self.config.environment.api_base_url, tokens, http=self.http, retry=self.retry,
                    limiter=self.limiter, allow_insecure=self.config.environment.allow_insecure)
            return self._apis[credential]

    def s3_tokens(self, credential: str):
        from filex_agent.transports.s3 import S3TokenCache

        api = self.api(credential)
        with self._lock:
            if credential not in self._s3_tokens:
                self._s3_tokens[credential] = S3TokenCache(api.s3_transfer_tokens, credential=credential)
            return self._s3_tokens[credential]

    def sftp_session(self, credential: str):
        from filex_agent.transports.sftp import SftpSession

        with self._lock:
            if credential not in self._sftp:
                c = self.credential(credential)
                env, s = self.config.environment, self.config.sftp
                self._sftp[credential] = SftpSession(
                    env.sftp_host, env.sftp_port, c.sftp_username,
                    password=resolve(c.sftp_password), private_key=c.sftp_private_key,
                    key_passphrase=resolve(c.sftp_key_passphrase), known_hosts=s.known_hosts,
                    host_key_fingerprints=list(s.host_key_fingerprints),
                    auto_accept_host_key=s.auto_accept_host_key,
                    tofu_known_hosts=self.config.agent.data_dir / "known_hosts" if s.auto_accept_host_key else None,
                    keepalive_seconds=s.keepalive_seconds,
                    connect_timeout=self.config.network.connect_timeout, channels=s.connections)
            return self._sftp[credential]

    def token_counts(self) -> list[tuple[str, object, int]]:
        """(kind, provider, tokens fetched so far) for every FIP and S3 token cache (metrics)."""
        with self._lock:
            fip = [("fip", p, int(getattr(p, "refreshes", 0))) for p in self._tokens.values()]
            s3 = [("s3", c, int(getattr(c, "fetch_count", 0))) for c in self._s3_tokens.values()]
        return fip + s3

    def transport(self, route: RouteSettings, kind: str | None = None) -> Transport:
        kind = kind or route.transports[0]
        if kind == "rest":
            from filex_agent.transports.rest import RestTransport

            return RestTransport(route.org, route.application, api=self.api(route.credential),
                                 http=self.http, retry=self.retry)
        if kind == "s3":
            from filex_agent.transports.s3 import S3Transport

            # A boto3 client is costly to build (it capped S3 at ~3 uploads/s when built per file)
            # and S3Transport is thread-safe: one per (credential, org, application), lent out.
            key = ("s3", route.credential, route.org, route.application)
            tokens = self.s3_tokens(route.credential)
            with self._lock:
                if key not in self._shared:
                    net = self.config.network
                    self._shared[key] = S3Transport(
                        route.org, route.application, tokens=tokens, settings=self.config.s3,
                        endpoint_url=self.config.environment.s3_endpoint_url, verify=self.verify,
                        connect_timeout=net.connect_timeout, read_timeout=net.read_timeout,
                        max_attempts=net.max_attempts)
                return _Borrowed(self._shared[key])
        if kind == "sftp":
            from filex_agent.transports.sftp import SftpTransport

            # Shared like S3: the transport remembers which remote folders it has checked
            # (a round trip per file otherwise); the SSH connection is per credential anyway.
            key = ("sftp", route.credential, route.org, route.application)
            session = self.sftp_session(route.credential)
            with self._lock:
                if key not in self._shared:
                    s = self.config.sftp
                    self._shared[key] = SftpTransport(route.org, route.application, session=session,
                                                      in_path=s.in_path, out_path=s.out_path)
                return _Borrowed(self._shared[key])
        raise ConfigError("routes.transport", f"unknown transport {kind!r}")

    def close(self) -> None:
        for shared in [*self._shared.values(), *self._sftp.values()]:
            try:
                shared.close()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                log.debug("closing %r failed", shared, exc_info=True)
        self.http.close()


class ConnectionLeases:
    """Who still uses which ``Connections``: after a reload the old set is closed as soon as the
    last upload (or cycle) that started under it ends, not kept open until the agent stops.

    ``lock`` is held while the owner swaps its current set, so a lease never lands on a set that
    has just been retired and closed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._users: dict[int, int] = {}  # id(Connections) -> leases
        self._retired: dict[int, Connections] = {}

    @contextlib.contextmanager
    def lease(self, current: Callable[[], "Connections"]) -> Iterator["Connections"]:
        with self.lock:
            conns = current()
            self._users[id(conns)] = self._users.get(id(conns), 0) + 1
        try:
            yield conns
        finally:
            with self.lock:
                left = self._users[id(conns)] = self._users[id(conns)] - 1
                if left == 0:
                    del self._users[id(conns)]
                done = self._retired.pop(id(conns)) if left == 0 and id(conns) in self._retired else None
            if done is not None:
                _close_quietly(done, "after its last upload")

    def retire(self, conns: "Connections") -> None:
        """``conns`` was replaced (the caller swapped it under ``lock``): close it once unused."""
        with self.lock:
            if self._users.get(id(conns)):
                self._retired[id(conns)] = conns
                return
        _close_quietly(conns, "at once (nothing in flight used it)")

    def close_retired(self) -> None:
        """At stop: whatever is still retired is closed now (the grace period is over)."""
        with self.lock:
            retired, self._retired = list(self._retired.values()), {}
        for conns in retired:
            _close_quietly(conns, "at stop")


def _close_quietly(conns: "Connections", when: str) -> None:
    try:
        conns.close()
        log.info("connections of the previous configuration closed %s", when)
    except Exception:  # noqa: BLE001 - closing is best effort
        log.debug("closing connections failed", exc_info=True)


class _Borrowed:
    """A shared transport lent for one operation: ending the loan does not close it."""

    def __init__(self, inner: Transport):
        object.__setattr__(self, "_inner", inner)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: object) -> None:
        # Per-operation hooks (on_ticket) stay on the loan, never on the shared transport.
        object.__setattr__(self, name, value)

    def upload(self, local, remote_name, progress=None, **hooks):  # type: ignore[no-untyped-def]
        # The loan's hooks go with the call: the shared transport serves other workers meanwhile.
        for name in ("on_commit", "on_ticket"):
            if name in self.__dict__:
                hooks.setdefault(name, self.__dict__[name])
        return self._inner.upload(local, remote_name, progress, **hooks)

    def __enter__(self) -> "_Borrowed":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def close(self) -> None:
        pass
