"""SFTP transport (paramiko) with OBO profiles.

One :class:`SftpSession` holds one SSH connection per credential and hands out up to
``channels`` SFTP channels over it, so many routes (orgs, applications) share one login.
A dropped connection is noticed on the next operation and re-established with bounded,
jittered backoff.

Safety rules that shape this module:

* Host keys are always verified (known_hosts and/or pinned ``SHA256:`` fingerprints).
* Only the algorithms fileX accepts are offered; GCM first (measured +58% with paramiko).
* fileX picks up whatever lands in ``in/`` under its name: the bytes go to ``in/.NAME.TOKEN.filepart``,
  its size is checked, ``on_commit`` is called, and a plain SFTPv3 rename (which refuses to
  replace an existing ``in/NAME``) makes it the filing. A temp file left by a failure is removed
  at the next upload of that name. A connection lost after the rename was sent raises
  ``UploadUnconfirmed``; it is never sent again here.
* Every use of paramiko's private API is in ``_paramiko_compat``.
"""

from __future__ import annotations

import base64
import contextlib
from collections import deque
import errno
import hashlib
import logging
import secrets
import os
import queue
import random
import socket
import stat as statmod
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, TypeVar

import paramiko
from paramiko.ssh_exception import IncompatiblePeer

from ..config import valid_remote_name
from ..errors import (
    AuthError,
    CredentialsRefused,
    FilexError,
    NotEntitledError,
    PermanentError,
    RemoteChangedError,
    TransientError,
    UploadUnconfirmed,
)
from ..localfile import LocalFile, open_for_upload
from . import ProgressFn, RemoteFile, Transport, UploadResult, register
from . import _paramiko_compat as compat

log = logging.getLogger(__name__)

# A temporary upload file not written to for this long is a leftover of a dead upload.
TEMP_STALE_SECONDS = 15 * 60
LEFTOVER_SWEEP_SECONDS = 5 * 60

T = TypeVar("T")

# --- Algorithms -----------------------------------------------------------------------------
# fileX's published lists (shared/reference/NOTES.md), in our order of preference, intersected
# at runtime with what the installed paramiko implements.
FILEX_CIPHERS: tuple[str, ...] = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
)
FILEX_KEX: tuple[str, ...] = (
    "mlkem768x25519-sha256",
    "mlkem768nistp256-sha256",
    "mlkem1024nistp384-sha384",
    "curve25519-sha256",
    "curve25519-sha256@libssh.org",
    "ecdh-sha2-nistp256",
    "ecdh-sha2-nistp384",
    "ecdh-sha2-nistp521",
    "diffie-hellman-group16-sha512",
    "diffie-hellman-group18-sha512",
    "diffie-hellman-group-exchange-sha256",
    "diffie-hellman-group14-sha256",
)
# fileX publishes no MAC list; SHA-2 only (unused anyway when GCM is agreed).
ALLOWED_MACS: tuple[str, ...] = (
    "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-512-etm@openssh.com",
    "hmac-sha2-256",
    "hmac-sha2-512",
)


def _supported(wanted: tuple[str, ...], available: object) -> tuple[str, ...]:
    have = set(available)  # type: ignore[call-overload]
    return tuple(a for a in wanted if a in have)


CIPHERS = _supported(FILEX_CIPHERS, compat.implemented("cipher"))
KEX = _supported(FILEX_KEX, compat.implemented("kex"))
MACS = _supported(ALLOWED_MACS, compat.implemented("mac"))

# Upload write request size. 32 KiB (paramiko's default) is what every SFTP server must accept;
# 128 KiB requests with 16 MiB in flight were the best on loopback against OpenSSH (best of 3,
# 1 GiB: ~320 MB/s vs ~280 for 32 KiB and 255 KiB; bench/bench_sftp.py, noisy on 2 cores). The size
# is capped by the server's limits@openssh.com answer when it gives one, and a session falls back
# to 32 KiB if its first upload with bigger requests is refused (a server with a smaller limit).
WRITE_REQUEST_SIZE = 128 * 1024
SAFE_WRITE_REQUEST_SIZE = 32 * 1024
READ_CHUNK = 256 * 1024
# Unacknowledged write bytes allowed before waiting for the oldest status.
MAX_IN_FLIGHT = 16 * 1024 * 1024
WINDOW_SIZE = 8 * 1024 * 1024
MAX_PACKET_SIZE = 64 * 1024


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH style ``SHA256:<base64 without padding>`` (as ``ssh-keygen -lf`` prints)."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _norm_fp(fp: str) -> str:
    fp = fp.strip()
    if fp.upper().startswith("SHA256:"):
        fp = "SHA256:" + fp[7:]
    return fp.rstrip("=")


_RecordingTransport = compat.RecordingTransport


def _is_connection_error(exc: BaseException) -> bool:
    if isinstance(exc, (EOFError, socket.timeout, TimeoutError, ConnectionError, paramiko.SSHException)):
        return True
    # IOErrors that carry an errno come from the server's status replies; others (socket) do not.
    return isinstance(exc, OSError) and exc.errno is None and "closed" in str(exc).lower()


class _Dropped(Exception):
    """Internal: the connection was lost during an operation, or could not be (re)established."""


class SftpSession:
    """One SSH connection per credential, reused across files and orgs; thread-safe; reconnects on drop."""

    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        *,
        password: str | None = None,
        private_key: Path | None = None,
        key_passphrase: str | None = None,
        known_hosts: Path | None = None,
        host_key_fingerprints: list[str] | tuple[str, ...] = (),
        auto_accept_host_key: bool = False,
        tofu_known_hosts: Path | None = None,
        keepalive_seconds: int = 30,
        connect_timeout: float = 10.0,
        channels: int = 2,
        max_attempts: int = 3,
        backoff_seconds: float = 0.5,
        op_timeout: float = 120.0,
        write_request_size: int = WRITE_REQUEST_SIZE,
    ):
        compat.check()  # a paramiko upgrade that moved a private API fails here, by name
        if password is None and private_key is None:
            raise AuthError(f"sftp {username}@{host}: neither a password nor a private key is configured")
        self.host = host
        self.port = port
        self.username = username
        self._password = password
        self._private_key_path = private_key
        self._key_passphrase = key_passphrase
        self._pkey: paramiko.PKey | None = None
        self.known_hosts = known_hosts
        self.host_key_fingerprints = [_norm_fp(f) for f in host_key_fingerprints]
        self.auto_accept_host_key = auto_accept_host_key
        # auto_accept_host_key is trust-on-first-use: the first key is recorded here (the agent's
        # own file) and any other key is refused afterwards.
        self.tofu_known_hosts = tofu_known_hosts
        self.keepalive_seconds = keepalive_seconds
        self.connect_timeout = connect_timeout
        self.channels = max(1, channels)
        self.max_attempts = max(1, max_attempts)
        self.backoff_seconds = backoff_seconds
        self.op_timeout = op_timeout
        self.write_request_size = write_request_size
        self._server_max_write: int | None = None
        self._write_size_proven = write_request_size <= SAFE_WRITE_REQUEST_SIZE
        self._lock = threading.RLock()
        self._transport: paramiko.Transport | None = None
        self._generation = 0
        self._idle: queue.LifoQueue[paramiko.SFTPClient] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(self.channels)
        self._closed = False
        # Observability (and tests): how many SSH connections were established.
        self.connects = 0
        self.negotiated: dict[str, str] = {}

    def __repr__(self) -> str:  # never shows the password
        return f"SftpSession({self.username}@{self.host}:{self.port})"

    @property
    def label(self) -> str:
        return f"sftp {self.username}@{self.host}:{self.port}"

    # --- connection -------------------------------------------------------------------------
    def _load_key(self) -> paramiko.PKey:
        if self._pkey is None:
            assert self._private_key_path is not None
            try:
                pw = self._key_passphrase.encode() if self._key_passphrase is not None else None
                self._pkey = paramiko.PKey.from_path(self._private_key_path, pw)
            except paramiko.PasswordRequiredException as e:
                raise AuthError(f"{self.label}: private key {self._private_key_path} needs a passphrase") from e
            except (paramiko.SSHException, ValueError) as e:
                raise AuthError(
                    f"{self.label}: cannot load private key {self._private_key_path} "
                    f"(wrong passphrase or unsupported format: {type(e).__name__})"
                ) from e
            except OSError as e:
                raise AuthError(f"{self.label}: cannot read private key {self._private_key_path}: {e.strerror}") from e
        return self._pkey

    @property
    def _known_hosts_name(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def _known_host_keys(self) -> dict[str, paramiko.PKey]:
        """Keys known for this host: the configured known_hosts, then the agent's own
        trust-on-first-use file (``{key type: key}``)."""
        found: dict[str, paramiko.PKey] = {}
        for path, configured in ((self.known_hosts, True), (self.tofu_known_hosts, False)):
            if path is None:
                continue
            hk = paramiko.HostKeys()
            try:
                hk.load(str(path))
            except FileNotFoundError:
                if configured:
                    log.warning("%s: known_hosts file %s does not exist", self.label, path)
                continue
            except OSError as e:
                raise PermanentError(f"{self.label}: cannot read known_hosts {path}: {e}") from e
            entry = hk.lookup(self._known_hosts_name)
            if entry:
                found.update({k: entry[k] for k in entry.keys() if k not in found})
        return found

    def _check_host_key(self, key: paramiko.PKey, known: dict[str, paramiko.PKey]) -> None:
        fp = fingerprint(key)
        if fp in self.host_key_fingerprints:
            return
        if any(k.asbytes() == key.asbytes() for k in known.values()):
            return
        ktype = key.get_name()
        hint = f'if it is legitimate (check with the operator), pin it: [sftp] host_key_fingerprints = ["{fp}"]'
        if known:
            # A key is known for this host and this is not it: refuse even with auto-accept,
            # as OpenSSH does, naming both keys.
            where = " or ".join(str(p) for p in (self.known_hosts, self.tofu_known_hosts) if p is not None)
            old = ", ".join(f"{t} {fingerprint(k)}" for t, k in known.items())
            msg = (f"{self.label}: host key CHANGED for {self._known_hosts_name}: known {old} (in {where}), "
                   f"server now offers {ktype} {fp} — possible man-in-the-middle, nothing is sent. If the "
                   f"change is legitimate (confirm with FINRA), remove the host's line from {where}; {hint}")
            log.error("%s", msg)
            raise PermanentError(msg)
        if self.host_key_fingerprints:
            raise PermanentError(
                f"{self.label}: host key mismatch: server offered {ktype} {fp}, pinned "
                f"{', '.join(self.host_key_fingerprints)}; {hint}"
            )
        if self.auto_accept_host_key:
            record = self.tofu_known_hosts or self.known_hosts
            if record is None:
                raise PermanentError(f"{self.label}: auto_accept_host_key needs a known_hosts file to record "
                                     f"the first key in; server offered {ktype} {fp}; {hint}")
            record.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "a", encoding="ascii") as f:
                f.write(f"{self._known_hosts_name} {ktype} {key.get_base64()}\n")
                f.flush()
                os.fsync(f.fileno())
            log.warning("%s: first connection: trusting host key %s %s and recording it in %s "
                        "(auto_accept_host_key=true); a different key is refused from now on",
                        self.label, ktype, fp, record)
            return
        raise PermanentError(f"{self.label}: unknown host key: server offered {ktype} {fp}; {hint}")

    def _negotiation_message(self, t: _RecordingTransport, exc: Exception) -> str:
        peer = t.peer_kexinit or {}
        what, ours, theirs = "algorithms", (), peer.get("kex_algo_list", [])
        text = str(exc).lower()
        if "kex" in text:
            what, ours = "key exchange", t.get_security_options().kex
            theirs = [a for a in peer.get("kex_algo_list", []) if not a.startswith(("ext-info", "kex-strict"))]
        elif "cipher" in text:
            what, ours = "ciphers", t.get_security_options().ciphers
            theirs = peer.get("server_encrypt_algo_list", [])
        elif "mac" in text:
            what, ours = "MACs", t.get_security_options().digests
            theirs = peer.get("server_mac_algo_list", [])
        elif "host key" in text:
            what, ours = "host key types", t.get_security_options().key_types
            theirs = peer.get("server_key_algo_list", [])
        return (
            f"{self.label}: SSH negotiation failed, no common {what}: server offered "
            f"{', '.join(theirs) or '?'}; we allow {', '.join(ours)} (fileX's list)"
        )

    def _connect(self) -> paramiko.Transport:
        """Open, verify and authenticate one SSH connection. Caller holds the lock."""
        known = self._known_host_keys()
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except OSError as e:
            raise TransientError(f"{self.label}: cannot connect: {e}") from e
        t = _RecordingTransport(sock, default_window_size=WINDOW_SIZE, default_max_packet_size=MAX_PACKET_SIZE)
        ok = False
        try:
            opts = t.get_security_options()
            opts.ciphers = CIPHERS
            opts.kex = KEX
            opts.digests = MACS
            if known:  # as OpenSSH does: ask for the key type we already know first
                opts.key_types = tuple(k for k in known if k in opts.key_types) + tuple(
                    k for k in opts.key_types if k not in known
                )
            t.banner_timeout = self.connect_timeout
            t.handshake_timeout = self.connect_timeout
            t.auth_timeout = self.connect_timeout
            try:
                t.start_client(timeout=self.connect_timeout)
            except IncompatiblePeer as e:
                raise PermanentError(self._negotiation_message(t, e)) from None
            except paramiko.SSHException as e:
                raise TransientError(f"{self.label}: SSH handshake failed: {e}") from e
            except (OSError, EOFError) as e:
                raise TransientError(f"{self.label}: connection lost during SSH handshake: {e!r}") from e
            key = t.get_remote_server_key()
            self._check_host_key(key, known)
            self._authenticate(t)
            if self.keepalive_seconds:
                t.set_keepalive(self.keepalive_seconds)
            self.negotiated = {
                "cipher": t.local_cipher,
                "mac": t.local_mac,
                "kex": type(t.kex_engine).__name__ if t.kex_engine else "",
                "host_key": f"{key.get_name()} {fingerprint(key)}",
            }
            log.info("%s: connected (%s)", self.label, self.negotiated["cipher"])
            ok = True
            self.connects += 1
            return t
        finally:
            if not ok:
                t.close()

    def _authenticate(self, t: paramiko.Transport) -> None:
        try:
            if self._private_key_path is not None:
                t.auth_publickey(self.username, self._load_key())
            else:
                assert self._password is not None
                t.auth_password(self.username, self._password, fallback=False)
        except paramiko.BadAuthenticationType as e:
            raise CredentialsRefused(f"{self.label}: server does not accept this login method; it allows {e.allowed_types}") from None
        except paramiko.AuthenticationException:
            how = "private key" if self._private_key_path is not None else "password"
            raise CredentialsRefused(f"{self.label}: login refused ({how})") from None
        except paramiko.SSHException as e:
            raise TransientError(f"{self.label}: login failed: {e}") from e
        if not t.is_authenticated():
            raise CredentialsRefused(f"{self.label}: login refused")

    def _ensure(self) -> tuple[paramiko.Transport, int]:
        with self._lock:
            if self._closed:
                raise PermanentError(f"{self.label}: session closed")
            if self._transport is None or not self._transport.is_active():
                self._reset_locked()
                self._transport = self._connect()
                self._generation += 1
            return self._transport, self._generation

    def _reset_locked(self) -> None:
        while True:
            try:
                c = self._idle.get_nowait()
            except queue.Empty:
                break
            with contextlib.suppress(Exception):
                c.close()
        if self._transport is not None:
            with contextlib.suppress(Exception):
                self._transport.close()
        self._transport = None

    def _drop(self, generation: int) -> None:
        """Forget the connection of ``generation`` (if still current) so the next use reconnects."""
        with self._lock:
            if generation == self._generation and self._transport is not None:
                log.warning("%s: connection lost; will reconnect", self.label)
                self._reset_locked()

    @contextlib.contextmanager
    def channel(self) -> Iterator[paramiko.SFTPClient]:
        """Borrow one SFTP channel; raises :class:`_Dropped` if the connection dies meanwhile."""
        if not self._slots.acquire(timeout=self.op_timeout):
            raise TransientError(f"{self.label}: no free SFTP channel after {self.op_timeout:.0f}s")
        try:
            try:
                t, gen = self._ensure()
            except TransientError as e:
                raise _Dropped(str(e)) from e
            client: paramiko.SFTPClient | None = None
            while client is None:
                try:
                    c = self._idle.get_nowait()
                except queue.Empty:
                    break
                if c.sock.get_transport() is t and not c.sock.closed:
                    client = c
                else:
                    with contextlib.suppress(Exception):
                        c.close()
            if client is None:
                try:
                    client = paramiko.SFTPClient.from_transport(t, window_size=WINDOW_SIZE, max_packet_size=MAX_PACKET_SIZE)
                except Exception as e:
                    if _is_connection_error(e) or not t.is_active():
                        self._drop(gen)
                        raise _Dropped(str(e)) from e
                    raise
                if client is None:
                    self._drop(gen)
                    raise _Dropped("could not open an SFTP channel")
                client.get_channel().settimeout(self.op_timeout)
                self._probe_limits(client, gen)
            healthy = False
            try:
                yield client
                healthy = True
            except UploadUnconfirmed:
                # Never turned into a retry of the operation: the request may have taken effect.
                if not t.is_active():
                    self._drop(gen)
                raise
            except Exception as e:
                if not t.is_active() or _is_connection_error(e):
                    with contextlib.suppress(Exception):
                        client.close()
                    if not t.is_active() or isinstance(e, (socket.timeout, TimeoutError)):
                        self._drop(gen)
                    raise _Dropped(f"{type(e).__name__}: {e}") from e
                raise
            finally:
                if healthy:
                    self._idle.put(client)
                elif t.is_active() and not client.sock.closed:
                    # A server-side error (no such file...) leaves the channel usable.
                    self._idle.put(client)
        finally:
            self._slots.release()

    def run(self, op: Callable[[paramiko.SFTPClient], T], what: str, *,
            on_retry: Callable[[paramiko.SFTPClient], None] | None = None) -> T:
        """Run ``op`` on a channel; on a dropped connection reconnect (bounded, jittered backoff)
        and call ``on_retry`` (e.g. remove a partial file) before running ``op`` again."""
        last: BaseException | None = None
        for attempt in range(1, self.max_attempts + 1):
            if attempt > 1:
                delay = self.backoff_seconds * 2 ** (attempt - 2)
                time.sleep(delay + random.uniform(0, delay))
            try:
                with self.channel() as sftp:
                    if attempt > 1 and on_retry is not None:
                        on_retry(sftp)
                    return op(sftp)
            except _Dropped as e:
                # Lost, or could not (re)connect: keep trying within the bound.
                last = e
                log.warning("%s: %s: connection problem (attempt %d/%d): %s", self.label, what, attempt, self.max_attempts, e)
        raise TransientError(f"{self.label}: {what}: gave up after {self.max_attempts} attempts: {last}")

    def _probe_limits(self, client: paramiko.SFTPClient, gen: int) -> None:
        """Ask an OpenSSH-style server for its write limit once per connection."""
        if getattr(self, "_probed_gen", None) == gen:
            return
        self._probed_gen = gen
        max_write = compat.openssh_max_write(client)
        if max_write is not None:  # else not an OpenSSH server: keep the configured size
            self._server_max_write = max_write

    def write_size(self) -> int:
        size = self.write_request_size
        if self._server_max_write:
            size = min(size, self._server_max_write)
        return max(1024, size)

    def upload_succeeded(self) -> None:
        self._write_size_proven = True

    def upload_failed(self, connection_alive: bool) -> None:
        """First upload with big requests failed while the connection stayed up (a server error or a
        closed channel, not a drop): assume the server's limit is lower and fall back."""
        if connection_alive and not self._write_size_proven and self._server_max_write is None and self.write_request_size > SAFE_WRITE_REQUEST_SIZE:
            log.warning("%s: upload with %d-byte write requests failed; falling back to %d bytes", self.label,
                        self.write_request_size, SAFE_WRITE_REQUEST_SIZE)
            self.write_request_size = SAFE_WRITE_REQUEST_SIZE
            self._write_size_proven = True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._reset_locked()

    def __enter__(self) -> "SftpSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- helpers --------------------------------------------------------------------------------
def _join(directory: str, name: str) -> str:
    return directory.rstrip("/") + "/" + name if directory != "/" else "/" + name


def _parent(path: str) -> str:
    parent = path.rstrip("/").rsplit("/", 1)[0]
    return parent or "/"


def _listdirs(sftp: paramiko.SFTPClient, path: str) -> list[str]:
    return sorted(a.filename for a in sftp.listdir_attr(path) if a.st_mode is None or statmod.S_ISDIR(a.st_mode))


def _stat_or_none(sftp: paramiko.SFTPClient, path: str) -> paramiko.SFTPAttributes | None:
    try:
        return sftp.stat(path)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return None
        raise


def _alive(sftp: paramiko.SFTPClient) -> bool:
    return sftp.sock.get_transport().is_active() and not sftp.sock.closed


def _mtime(attr: paramiko.SFTPAttributes) -> datetime | None:
    return datetime.fromtimestamp(attr.st_mtime, timezone.utc) if attr.st_mtime is not None else None


def list_profiles(session: SftpSession, root: str = "/") -> dict[str, list[str]]:
    """``{org: [apps...]}`` visible after login (OBO orgs are top-level folders on fileX)."""

    def op(sftp: paramiko.SFTPClient) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for org in _listdirs(sftp, root):
            try:
                out[org] = _listdirs(sftp, _join(root, org))
            except PermissionError:
                out[org] = []
        return out

    return session.run(op, "list profiles")


# --- transport ------------------------------------------------------------------------------
@register("sftp")
class SftpTransport(Transport):
    reports_commit = True  # on_commit before each request that can make the filing

    def __init__(
        self,
        org: str,
        application: str,
        *,
        session: SftpSession,
        in_path: str = "/{org}/{app}/in",
        out_path: str = "/{org}/{app}/out",
        arcv_path: str | None = "/{org}/{app}/in_arcv",
    ):
        super().__init__(org, application)
        self.session = session
        self._templates = {"in": in_path, "out": out_path}
        self.in_dir = in_path.format(org=org, app=application)
        self.out_dir = out_path.format(org=org, app=application)
        self.arcv_dir = arcv_path.format(org=org, app=application) if arcv_path else None
        self._verified: set[str] = set()
        # Temporary files of failed uploads whose removal failed too: removed at the next upload
        # of that name (a crash's leftovers are removed once stale, see _remove_leftovers).
        self._leftovers: dict[str, set[str]] = {}
        self._leftover_lock = threading.Lock()
        self._last_sweep: float | None = None  # monotonic time of the last listing for leftovers

    def __repr__(self) -> str:
        return f"SftpTransport({self.org}/{self.application} via {self.session!r})"

    # --- entitlement --------------------------------------------------------------------------
    def _entitlement_error(self, sftp: paramiko.SFTPClient, directory: str) -> PermanentError:
        """Explain why ``directory`` is missing: org folder absent → not entitled (list what is)."""
        template = self._templates["in"] if directory == self.in_dir else self._templates["out"]
        parts = template.split("/")
        for placeholder, value, what in (("{org}", self.org, "org"), ("{app}", self.application, "application")):
            if placeholder not in parts:
                continue
            idx = parts.index(placeholder)
            prefix = "/".join(parts[: idx + 1]).format(org=self.org, app=self.application) or "/"
            if _stat_or_none(sftp, prefix) is None:
                parent = _parent(prefix)
                try:
                    visible = _listdirs(sftp, parent)
                except OSError:
                    visible = []
                if what == "org":
                    return NotEntitledError(
                        f"{self.session.label}: org {self.org} is not visible to this login (no {prefix} folder); "
                        f"orgs it can act for: {', '.join(visible) or 'none'}"
                    )
                return NotEntitledError(
                    f"{self.session.label}: application {self.application} is not visible for org {self.org} "
                    f"(no {prefix} folder); applications: {', '.join(visible) or 'none'}"
                )
        return PermanentError(f"{self.session.label}: remote folder {directory} does not exist")

    def _verify(self, sftp: paramiko.SFTPClient, directory: str) -> None:
        if directory in self._verified:
            return
        attr = _stat_or_none(sftp, directory)
        if attr is None:
            raise self._entitlement_error(sftp, directory)
        self._verified.add(directory)

    def _server_error(self, e: OSError, what: str) -> FilexError:
        if e.errno == errno.EACCES:
            return NotEntitledError(f"{self.session.label}: {what}: permission denied")
        if e.errno == errno.ENOENT:
            return PermanentError(f"{self.session.label}: {what}: no such file")
        return TransientError(f"{self.session.label}: {what}: server error: {e}")

    # --- upload ---------------------------------------------------------------------------------
    def temp_path(self, remote_name: str, token: str) -> str:
        """Where the bytes go before the rename: a dot name fileX does not take as a filing. The
        token is one upload's own: two writers of one name (a worker paused past its lease and
        its successor, or two files of one name) never share, remove or rename each other's."""
        return _join(self.in_dir, f".{remote_name}.{token}.filepart")

    def _remove_leftovers(self, sftp: paramiko.SFTPClient, remote_name: str) -> None:
        """Temporary files that a crash or a killed session left behind: removed when untouched
        for TEMP_STALE_SECONDS (a live upload writes its own all the time). The folder is listed
        once per LEFTOVER_SWEEP_SECONDS, not per upload: ``in/`` may hold thousands of files
        waiting for fileX, and listing it before each one made an upload cost O(files there)."""
        with self._leftover_lock:
            mine = self._leftovers.pop(remote_name, set())
            now_mono = time.monotonic()
            due = self._last_sweep is None or now_mono - self._last_sweep >= LEFTOVER_SWEEP_SECONDS
            if due:
                self._last_sweep = now_mono
        for temp in mine:  # this process's own, whose removal failed when its upload did
            self._remove_temp(sftp, temp)
        if not due:
            return
        now = time.time()
        try:
            entries = sftp.listdir_attr(self.in_dir)
        except (OSError, EOFError, paramiko.SSHException) as e:
            log.debug("%s: cannot list %s for leftover temporary files: %s", self.session.label, self.in_dir, e)
            return
        for e in entries:
            if (e.filename.startswith(".") and e.filename.endswith(".filepart")
                    and now - (e.st_mtime or now) > TEMP_STALE_SECONDS):
                self._remove_temp(sftp, _join(self.in_dir, e.filename))

    def upload(self, local: LocalFile | Path, remote_name: str, progress: ProgressFn | None = None, *,
               on_commit: Callable[[], None] | None = None,
               on_ticket: Callable[[str], None] | None = None) -> UploadResult:
        reason = valid_remote_name(remote_name)
        if reason or "/" in remote_name:
            raise PermanentError(f"cannot upload as {remote_name!r}: {reason or 'contains /'}")
        with open_for_upload(local) as lf:
            return self._upload(lf, remote_name, progress, self._hooks(on_commit, on_ticket)[0])

    def _upload(self, lf: LocalFile, remote_name: str, progress: ProgressFn | None,
                on_commit: Callable[[], None]) -> UploadResult:
        """Write ``in/.NAME.filepart``, check its size, ``on_commit``, rename it to ``in/NAME``.

        Before the rename nothing is filed: a dropped connection re-runs the whole operation (the
        temp file is removed first). The rename is the commit: plain SFTPv3 rename, which refuses
        to replace an existing ``in/NAME`` (OpenSSH: link()+unlink()), so an earlier filing still
        waiting at fileX is never overwritten. A connection lost once the rename was sent raises
        ``UploadUnconfirmed``: it may have happened, and it is not sent again.
        """
        size = lf.size
        remote = _join(self.in_dir, remote_name)
        temp = self.temp_path(remote_name, secrets.token_hex(4))
        started = datetime.now(timezone.utc)
        state: dict[str, object] = {}

        def cleanup(sftp: paramiko.SFTPClient) -> None:
            state["reconnected"] = True  # on_retry: the previous attempt was cut off before the rename

        def op(sftp: paramiko.SFTPClient) -> dict[str, str]:
            self._verify(sftp, self.in_dir)
            if state.get("reconnected"):
                self._remove_temp(sftp, temp)  # this upload's own half file, when a reconnect re-runs op
            self._remove_leftovers(sftp, remote_name)
            if _stat_or_none(sftp, remote) is not None:
                raise TransientError(f"{self.session.label}: an earlier {remote} is still waiting at fileX; "
                                     "not sent (it would replace that filing): will retry")
            digest = self._send(sftp, lf, temp, progress)
            attr = sftp.stat(temp)
            if attr.st_size != size:
                self._remove_temp(sftp, temp)
                raise TransientError(
                    f"{self.session.label}: {temp} has {attr.st_size} bytes after upload, expected {size}; removed")
            state["sha256"] = digest
            if not _alive(sftp):
                raise EOFError("connection lost before the rename")  # nothing filed: op is re-run
            on_commit()
            self._rename(sftp, temp, remote)
            return {"remote_size": str(attr.st_size), "remote_path": remote}

        req_before = self.session.write_size()
        try:
            try:
                detail = self.session.run(op, f"upload {remote}", on_retry=cleanup)
            except (OSError, TransientError) as e:
                if isinstance(e, (RemoteChangedError, UploadUnconfirmed)) or self.session.write_size() >= req_before:
                    raise
                # The session just fell back to small write requests: try once more with them.
                state["reconnected"] = True
                detail = self.session.run(op, f"upload {remote}", on_retry=cleanup)
        except UploadUnconfirmed:
            raise
        except Exception as e:
            # Best effort, over a fresh channel; else the next upload of this name removes it.
            try:
                self.session.run(lambda c: self._remove_temp(c, temp), f"remove {temp}")
            except Exception:  # noqa: BLE001
                with self._leftover_lock:
                    self._leftovers.setdefault(remote_name, set()).add(temp)
            if isinstance(e, OSError):
                raise self._server_error(e, f"upload {remote}") from e
            raise
        if state.get("reconnected"):
            detail["reconnected"] = "yes"
        return UploadResult(
            remote_name=remote_name,
            upload_location=self.upload_location,
            size=size,
            started_at=started,
            finished_at=datetime.now(timezone.utc),
            tracking_id=None,
            detail=detail,
            sent_sha256=state.get("sha256"),  # type: ignore[arg-type]
        )

    def _remove_temp(self, sftp: paramiko.SFTPClient, temp: str) -> None:
        try:
            sftp.remove(temp)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return
            if e.errno is None:
                raise  # the connection, not the file
            log.warning("%s: cannot remove %s: %s", self.session.label, temp, e)
            return
        log.warning("%s: removed %s left by an earlier failed upload", self.session.label, temp)

    def _rename(self, sftp: paramiko.SFTPClient, temp: str, remote: str) -> None:
        try:
            # Plain SSH_FXP_RENAME, never posix-rename@openssh.com: it must not replace in/NAME.
            sftp.rename(temp, remote)
        except (OSError, EOFError, paramiko.SSHException) as e:
            # paramiko raises a status reply as IOError, without errno for SSH_FX_FAILURE (what
            # OpenSSH answers when link() finds in/NAME): an OSError on a live connection is the
            # server's refusal, nothing was filed. Anything else: the rename may have happened.
            if not isinstance(e, OSError) or isinstance(e, TimeoutError) or not _alive(sftp):
                raise self._unconfirmed(remote, e) from None
            exists = _stat_or_none(sftp, remote) is not None
            self._remove_temp(sftp, temp)
            if exists:
                raise TransientError(f"{self.session.label}: an earlier {remote} is still waiting at fileX; "
                                     "the rename was refused, nothing filed: will retry") from None
            if e.errno == errno.ENOENT:
                # The temporary file is gone (removed by someone else): nothing was filed.
                raise TransientError(f"{self.session.label}: rename {temp} to {remote}: the temporary file "
                                     "is gone; nothing filed: will retry") from None
            raise self._server_error(e, f"rename {temp} to {remote}") from None

    def _unconfirmed(self, remote: str, e: BaseException) -> UploadUnconfirmed:
        log.warning("%s: connection lost after the rename to %s was sent (%s); not sent again",
                    self.session.label, remote, type(e).__name__)
        return UploadUnconfirmed(f"{self.session.label}: connection lost after the rename to {remote} was sent "
                                 f"({type(e).__name__}); fileX may have it")

    def _send(self, sftp: paramiko.SFTPClient, lf: LocalFile, remote: str, progress: ProgressFn | None) -> str:
        """Pipelined write of ``lf`` to ``remote``, checking the server's status of EVERY write;
        the SHA-256 of the bytes written.

        Why not ``SFTPFile.set_pipelined(True)`` + ``write``: paramiko registers pipelined writes
        without an owner and its ``close()`` discards their statuses, so a refused write goes
        unnoticed (the file then has the right size with a hole of zeros). Here each write's
        status is read back, at most ``MAX_IN_FLIGHT`` bytes ahead.
        """
        try:
            dst = sftp.open(remote, "wb")
        except OSError as e:
            if e.errno is not None:
                raise self._server_error(e, f"open {remote} for writing") from e
            raise
        req = self.session.write_size()
        pending: deque[tuple[int, int]] = deque()  # (request number, length)
        in_flight = 0
        digest = hashlib.sha256()
        try:
            offset = 0
            for data in lf.blocks(req):
                digest.update(data)
                num = compat.send_write(sftp, dst.handle, offset, data)
                pending.append((num, len(data)))
                in_flight += len(data)
                offset += len(data)
                while in_flight > MAX_IN_FLIGHT:
                    in_flight -= self._ack(sftp, pending, progress)
            while pending:
                self._ack(sftp, pending, progress)
            if offset != lf.size or lf.changed():
                raise RemoteChangedError(f"{lf.path} changed while it was being uploaded")
        except BaseException as e:
            alive = _alive(sftp)
            if not isinstance(e, RemoteChangedError):
                self.session.upload_failed(alive)
            if alive:
                # Abort by closing the whole SFTP channel, not the file handle: a server that
                # publishes a file when its handle is closed must not see this one closed.
                with contextlib.suppress(Exception):
                    sftp.close()
            raise
        try:
            dst.close()
        except BaseException:
            self.session.upload_failed(sftp.sock.get_transport().is_active())
            raise
        self.session.upload_succeeded()
        return digest.hexdigest()

    @staticmethod
    def _ack(sftp: paramiko.SFTPClient, pending: deque[tuple[int, int]], progress: ProgressFn | None) -> int:
        num, n = pending.popleft()
        compat.read_status(sftp, num)  # raises IOError on an error status
        if progress:
            progress(n)
        return n

    # --- feedback -------------------------------------------------------------------------------
    def list_feedback(self) -> list[RemoteFile]:
        def op(sftp: paramiko.SFTPClient) -> list[RemoteFile]:
            self._verify(sftp, self.out_dir)
            return sorted(
                (
                    RemoteFile(name=a.filename, size=a.st_size, modified=_mtime(a))
                    for a in sftp.listdir_attr(self.out_dir)
                    if a.st_mode is None or statmod.S_ISREG(a.st_mode)
                ),
                key=lambda f: f.name,
            )

        try:
            return self.session.run(op, f"list {self.out_dir}")
        except OSError as e:
            raise self._server_error(e, f"list {self.out_dir}") from e

    def download_feedback(self, name: str, dest: BinaryIO, progress: ProgressFn | None = None) -> int:
        if "/" in name or name in ("", ".", ".."):
            raise PermanentError(f"bad feedback file name {name!r}")
        remote = _join(self.out_dir, name)
        seekable = dest.seekable()
        start = dest.tell() if seekable else 0
        attempts = [0]

        def op(sftp: paramiko.SFTPClient) -> int:
            attempts[0] += 1
            if attempts[0] > 1:
                # A retry starts over: rewind what a dropped attempt wrote.
                if not seekable:
                    raise TransientError(f"{self.session.label}: {remote}: connection dropped mid-download")
                dest.seek(start)
                dest.truncate()
            with sftp.open(remote, "rb") as f:
                size = f.stat().st_size
                f.prefetch(size)
                n = 0
                while True:
                    data = f.read(READ_CHUNK)
                    if not data:
                        break
                    dest.write(data)
                    n += len(data)
                    if progress:
                        progress(len(data))
            if size is not None and n != size:
                raise TransientError(f"{self.session.label}: {remote}: got {n} bytes, expected {size}")
            return n

        try:
            return self.session.run(op, f"download {remote}")
        except OSError as e:
            raise self._server_error(e, f"download {remote}") from e

    def find_uploaded(self, remote_name: str) -> RemoteFile | None:
        """``in/remote_name`` with its size and modification time; None when absent or when this
        login may not look (permission denied: cannot know). Never looks at ``in_arcv``."""
        remote = _join(self.in_dir, remote_name)

        def op(sftp: paramiko.SFTPClient) -> RemoteFile | None:
            try:
                attr = _stat_or_none(sftp, remote)
            except PermissionError:
                log.debug("%s: stat %s refused: presence unknown", self.session.label, remote)
                return None
            if attr is None:
                return None
            return RemoteFile(name=remote_name, size=attr.st_size, modified=_mtime(attr))

        try:
            return self.session.run(op, f"stat {remote}")
        except OSError as e:
            raise self._server_error(e, f"stat {remote}") from e

    def close(self) -> None:
        # The session is shared across routes; its owner closes it.
        pass
