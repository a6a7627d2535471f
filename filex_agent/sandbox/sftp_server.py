"""The sandbox's SFTP endpoint: a paramiko server that looks like fileX's SFTP over S3.

Layout after login: ``/`` lists the orgs the login may act for (prime + OBO), ``/{org}`` its
applications, ``/{org}/{app}`` the sub-spaces ``in``, ``out`` and ``in_arcv``. Everything is
backed by the sandbox bucket (keys ``{org}/{app}/{sub}/{name}``):

* reads (``out``, ``in_arcv``) stream from the bucket;
* writes go to ``in`` only; bytes land in a local temp file and are published with
  ``put_object`` (Metadata ``filex-transport: sftp``) when the client closes the handle. Like an
  S3-backed SFTP gateway, a handle left open by a dropped session is published too, with what
  arrived (``publish_on_drop``): a client that dies after creating ``in/NAME`` files a 0-byte or
  truncated file. A client must therefore write to a temporary name and rename it into place;
* the processor never takes ``.NAME.TOKEN.filepart`` (or any name starting with ``.``) as a filing;
  ``rename`` inside one ``in`` folder is a copy then delete in the bucket, and is refused when
  the target exists (SFTPv3 rename, as OpenSSH without posix-rename; ``posix-rename`` is not
  offered);
* ``remove`` works in ``in`` (so a client can clean up), nothing else may be changed.

Faults (``Sandbox.inject_fault(kind, target="sftp", operation=..., after=...)``): ``drop`` kills
the session before the operation runs, ``drop`` with ``after=True`` lets it complete on the server
(file published, rename done) and kills the session before the reply is sent. ``path_prefix``
matches the SFTP path (``/0001/app1/in/NAME``; for a rename, the new path).

The server offers only the algorithms fileX accepts, so a client that works here negotiates
with fileX too. The host key is an ed25519 key kept in ``data_dir`` (stable across restarts,
so a pinned fingerprint stays valid).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import socket
import stat as statmod
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import paramiko
from paramiko.sftp import SFTP_FAILURE, SFTP_NO_SUCH_FILE, SFTP_OK, SFTP_OP_UNSUPPORTED, SFTP_PERMISSION_DENIED

from ..transports.sftp import CIPHERS, KEX, MACS, fingerprint

log = logging.getLogger(__name__)

SUBSPACES = ("in", "out", "in_arcv")
READABLE = ("out", "in_arcv")
METADATA = {"filex-transport": "sftp"}


def _load_or_create_host_key(path: Path) -> paramiko.PKey:
    if not path.exists():
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
    return paramiko.Ed25519Key(filename=str(path))


def _dir_attr(name: str) -> paramiko.SFTPAttributes:
    a = paramiko.SFTPAttributes()
    a.filename = name
    a.st_mode = statmod.S_IFDIR | 0o755
    a.st_size = 0
    a.st_mtime = a.st_atime = int(time.time())
    return a


def _file_attr(name: str, size: int, mtime: float) -> paramiko.SFTPAttributes:
    a = paramiko.SFTPAttributes()
    a.filename = name
    a.st_mode = statmod.S_IFREG | 0o644
    a.st_size = size
    a.st_mtime = a.st_atime = int(mtime)
    return a


class _Auth(paramiko.ServerInterface):
    def __init__(self, server: "SandboxSftpServer"):
        self.server = server

    def get_allowed_auths(self, username: str) -> str:
        return "password,publickey"

    def check_auth_password(self, username: str, password: str) -> int:
        sb = self.server.sandbox
        ok = hmac.compare_digest(username.encode(), sb.sftp_username.encode()) and hmac.compare_digest(
            password.encode(), str(sb.sftp_password).encode()
        )
        return paramiko.AUTH_SUCCESSFUL if ok else paramiko.AUTH_FAILED

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        if username != self.server.sandbox.sftp_username:
            return paramiko.AUTH_FAILED
        for allowed in self.server.authorized_keys:
            blob = allowed.asbytes() if isinstance(allowed, paramiko.PKey) else _parse_pub(allowed)
            if blob == key.asbytes():
                return paramiko.AUTH_SUCCESSFUL
        return paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return paramiko.OPEN_SUCCEEDED if kind == "session" else paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED


def _parse_pub(line: str) -> bytes:
    import base64

    parts = line.split()
    return base64.b64decode(parts[1]) if len(parts) >= 2 else b""


class _ReadHandle(paramiko.SFTPHandle):
    def __init__(self, spool: Any, name: str, size: int, mtime: float):
        super().__init__(os.O_RDONLY)
        self.readfile = spool
        self._attr = _file_attr(name, size, mtime)

    def stat(self) -> paramiko.SFTPAttributes:
        return self._attr


class _WriteHandle(paramiko.SFTPHandle):
    def __init__(self, si: "_SftpFs", key: str, spool: Any):
        super().__init__(os.O_WRONLY)
        self.si = si
        self.key = key
        self.path = "/" + key
        self.writefile = spool
        self._done = False

    def stat(self) -> paramiko.SFTPAttributes:
        return paramiko.SFTPAttributes.from_stat(os.fstat(self.writefile.fileno()), self.key.rsplit("/", 1)[-1])

    def chattr(self, attr: paramiko.SFTPAttributes) -> int:
        return SFTP_OK

    def write(self, offset: int, data: bytes) -> int:
        limit = self.si.server.max_write
        if limit is not None and len(data) > limit:
            return SFTP_FAILURE
        return self.si.faulted("write", self.path, lambda: super(_WriteHandle, self).write(offset, data))

    def close(self) -> None:
        if self._done:
            return
        if self.si.ended:
            self._publish()
            return
        self.si.faulted("close", self.path, self._publish)
        if not self._done:  # the session was killed before this close: a teardown, as above
            self._publish()

    def _publish(self) -> int:
        if self._done:
            return SFTP_OK
        self._done = True
        try:
            if self.si.ended or self.si.killed:
                # Session torn down with the handle open: an S3-backed gateway stores what it got.
                if not self.si.server.publish_on_drop:
                    log.warning("sandbox sftp: discarding unfinished upload %s (connection dropped)", self.key)
                    return SFTP_OK
                log.warning("sandbox sftp: session dropped with %s open; storing what arrived", self.key)
            self.writefile.flush()
            self.writefile.seek(0)
            self.si.server.s3.put_object(
                Bucket=self.si.server.sandbox.bucket, Key=self.key, Body=self.writefile, Metadata=dict(METADATA)
            )
            log.info("sandbox sftp: received %s", self.key)
            self.si.server.arrived(self.key, "SftpClose")
            return SFTP_OK
        finally:
            self.writefile.close()


class _SftpFs(paramiko.SFTPServerInterface):
    """The virtual file system; one instance per SFTP session."""

    def __init__(self, ssh_server: _Auth, *args: Any, **kwargs: Any):
        super().__init__(ssh_server, *args, **kwargs)
        self.server: SandboxSftpServer = ssh_server.server
        self.ended = False
        self.killed = False  # by a fault, before paramiko's teardown sets ``ended``
        self.channel: paramiko.Channel | None = None  # set by _SftpSubsystem

    def session_ended(self) -> None:
        self.ended = True

    def kill_session(self) -> None:
        """Close the whole SSH connection now: no reply to the current request leaves."""
        self.killed = True
        transport = self.channel.get_transport() if self.channel is not None else None
        if transport is not None:
            transport.close()

    def faulted(self, operation: str, path: str, run: Callable[[], Any]) -> Any:
        """Run one SFTP operation under the armed sftp faults (see the module docstring)."""
        after = None
        for fault in self.server.sandbox.take_faults(path, target="sftp", method="SFTP", operation=operation):
            if fault.kind == "slow":
                time.sleep(fault.seconds)
            elif fault.after:
                after = fault
            else:
                log.info("sandbox sftp fault: session killed before %s %s", operation, path)
                self.kill_session()
                return SFTP_FAILURE
        result = run()
        if after is not None:
            log.info("sandbox sftp fault: %s %s done, session killed before the reply", operation, path)
            self.kill_session()
        return result

    # path → (org, app, sub, name) with entitlement checks; raises OSError(ENOENT)
    def _parse(self, path: str) -> tuple[str | None, str | None, str | None, str | None]:
        parts = [p for p in self.canonicalize(path).split("/") if p]
        if len(parts) > 4:
            raise FileNotFoundError(path)
        org, app, sub, name = (parts + [None] * 4)[:4]
        ent = self.server.sandbox.entitlements
        if org is not None and org not in ent:
            raise FileNotFoundError(path)
        if app is not None and app not in ent[org]:
            raise FileNotFoundError(path)
        if sub is not None and sub not in SUBSPACES:
            raise FileNotFoundError(path)
        return org, app, sub, name

    def _head(self, key: str) -> tuple[int, float] | None:
        try:
            r = self.server.s3.head_object(Bucket=self.server.sandbox.bucket, Key=key)
        except Exception as e:  # botocore ClientError 404
            code = getattr(e, "response", {}).get("Error", {}).get("Code")
            if code in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return int(r["ContentLength"]), r["LastModified"].timestamp()

    def _objects(self, prefix: str) -> list[paramiko.SFTPAttributes]:
        out = []
        paginator = self.server.s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.server.sandbox.bucket, Prefix=prefix, Delimiter="/"):
            for o in page.get("Contents", []):
                name = o["Key"][len(prefix):]
                if name:
                    out.append(_file_attr(name, int(o["Size"]), o["LastModified"].timestamp()))
        return out

    def list_folder(self, path: str) -> list[paramiko.SFTPAttributes] | int:
        return self.faulted("list", self.canonicalize(path), lambda: self._list_folder(path))

    def _list_folder(self, path: str) -> list[paramiko.SFTPAttributes] | int:
        try:
            org, app, sub, name = self._parse(path)
            ent = self.server.sandbox.entitlements
            if org is None:
                return [_dir_attr(o) for o in sorted(ent)]
            if app is None:
                return [_dir_attr(a) for a in sorted(ent[org])]
            if sub is None:
                return [_dir_attr(s) for s in SUBSPACES]
            if name is None:
                return self._objects(f"{org}/{app}/{sub}/")
            return SFTP_NO_SUCH_FILE
        except FileNotFoundError:
            return SFTP_NO_SUCH_FILE
        except Exception:
            log.exception("sandbox sftp: list %s", path)
            return SFTP_FAILURE

    def stat(self, path: str) -> paramiko.SFTPAttributes | int:
        return self.faulted("stat", self.canonicalize(path), lambda: self._stat(path))

    def _stat(self, path: str) -> paramiko.SFTPAttributes | int:
        try:
            org, app, sub, name = self._parse(path)
            if name is None:
                return _dir_attr((sub or app or org or "/"))
            head = self._head(f"{org}/{app}/{sub}/{name}")
            if head is None:
                return SFTP_NO_SUCH_FILE
            return _file_attr(name, *head)
        except FileNotFoundError:
            return SFTP_NO_SUCH_FILE
        except Exception:
            log.exception("sandbox sftp: stat %s", path)
            return SFTP_FAILURE

    lstat = stat

    def open(self, path: str, flags: int, attr: paramiko.SFTPAttributes) -> paramiko.SFTPHandle | int:
        return self.faulted("open", self.canonicalize(path), lambda: self._open(path, flags))

    def _open(self, path: str, flags: int) -> paramiko.SFTPHandle | int:
        try:
            org, app, sub, name = self._parse(path)
        except FileNotFoundError:
            return SFTP_NO_SUCH_FILE
        if name is None:
            return SFTP_PERMISSION_DENIED if sub is None else SFTP_FAILURE
        key = f"{org}/{app}/{sub}/{name}"
        writing = bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC))
        try:
            if writing:
                if sub != "in" or flags & os.O_RDWR:
                    return SFTP_PERMISSION_DENIED
                spool = tempfile.TemporaryFile(dir=self.server.spool_dir)
                return _WriteHandle(self, key, spool)
            if sub not in READABLE:
                return SFTP_PERMISSION_DENIED
            head = self._head(key)
            if head is None:
                return SFTP_NO_SUCH_FILE
            spool = tempfile.TemporaryFile(dir=self.server.spool_dir)
            self.server.s3.download_fileobj(self.server.sandbox.bucket, key, spool)
            spool.seek(0)
            return _ReadHandle(spool, name, *head)
        except Exception:
            log.exception("sandbox sftp: open %s", path)
            return SFTP_FAILURE

    def remove(self, path: str) -> int:
        return self.faulted("remove", self.canonicalize(path), lambda: self._remove(path))

    def _remove(self, path: str) -> int:
        try:
            org, app, sub, name = self._parse(path)
            if name is None or sub != "in":
                return SFTP_PERMISSION_DENIED
            key = f"{org}/{app}/{sub}/{name}"
            if self._head(key) is None:
                return SFTP_NO_SUCH_FILE
            self.server.s3.delete_object(Bucket=self.server.sandbox.bucket, Key=key)
            return SFTP_OK
        except FileNotFoundError:
            return SFTP_NO_SUCH_FILE
        except Exception:
            log.exception("sandbox sftp: remove %s", path)
            return SFTP_FAILURE

    def rename(self, oldpath: str, newpath: str) -> int:
        return self.faulted("rename", self.canonicalize(newpath), lambda: self._rename(oldpath, newpath))

    def _rename(self, oldpath: str, newpath: str) -> int:
        """Within one ``in`` folder only; copy then delete, as an S3-backed gateway does. The
        target is created whole (one CopyObject), so the processor never sees half of it."""
        try:
            src = self._parse(oldpath)
            dst = self._parse(newpath)
        except FileNotFoundError:
            return SFTP_NO_SUCH_FILE
        if src[3] is None or dst[3] is None or src[2] != "in" or src[:3] != dst[:3]:
            return SFTP_PERMISSION_DENIED
        bucket = self.server.sandbox.bucket
        src_key, dst_key = "/".join(src), "/".join(dst)  # type: ignore[arg-type]
        try:
            with self.server.rename_lock:
                if self._head(src_key) is None:
                    return SFTP_NO_SUCH_FILE
                if src_key == dst_key or self._head(dst_key) is not None:
                    return SFTP_FAILURE  # SFTPv3: never onto an existing file
                self.server.s3.copy_object(Bucket=bucket, Key=dst_key, CopySource={"Bucket": bucket, "Key": src_key},
                                           MetadataDirective="COPY")
                self.server.s3.delete_object(Bucket=bucket, Key=src_key)
            log.info("sandbox sftp: renamed %s to %s", src_key, dst_key)
            self.server.arrived(dst_key, "SftpRename")
            return SFTP_OK
        except Exception:
            log.exception("sandbox sftp: rename %s %s", oldpath, newpath)
            return SFTP_FAILURE

    def posix_rename(self, oldpath: str, newpath: str) -> int:
        return SFTP_OP_UNSUPPORTED  # no overwriting rename: a filing is never replaced

    def mkdir(self, path: str, attr: paramiko.SFTPAttributes) -> int:
        return SFTP_PERMISSION_DENIED

    def rmdir(self, path: str) -> int:
        return SFTP_PERMISSION_DENIED

    def chattr(self, path: str, attr: paramiko.SFTPAttributes) -> int:
        return SFTP_PERMISSION_DENIED

    def symlink(self, target_path: str, path: str) -> int:
        return SFTP_PERMISSION_DENIED


class _SftpSubsystem(paramiko.SFTPServer):
    """paramiko's SFTP server; our handles learn from ``session_ended`` that a close is a teardown,
    and the file system gets the channel so a fault can kill the session."""

    def __init__(self, channel: paramiko.Channel, name: str, server: Any, sftp_si: Any, *args: Any,
                 **kwargs: Any) -> None:
        super().__init__(channel, name, server, sftp_si, *args, **kwargs)
        self.server.channel = channel


class SandboxSftpServer:
    """SFTP endpoint of the sandbox. ``start()`` binds 127.0.0.1 on a free port."""

    def __init__(self, sandbox: Any, *, port: int | None = None):
        self.sandbox = sandbox
        self.host = "127.0.0.1"
        self.port = 0
        self._want_port = port if port is not None else int(getattr(sandbox, "sftp_port", 0) or 0)
        self.data_dir = Path(sandbox.data_dir)
        self.host_key_file = self.data_dir / "sftp_host_ed25519_key"
        self.host_key = _load_or_create_host_key(self.host_key_file)
        self.host_key_fingerprint = fingerprint(self.host_key)
        self.host_key_path = self.data_dir / "sftp_known_hosts"
        self.spool_dir = self.data_dir / "sftp_spool"
        # Public keys accepted for sandbox.sftp_username: paramiko PKeys or "ssh-ed25519 AAAA..." lines.
        self.authorized_keys: list[paramiko.PKey | str] = list(getattr(sandbox, "sftp_authorized_keys", []) or [])
        # Refuse write requests bigger than this (to mimic servers with a small limit).
        self.max_write: int | None = None
        # A write handle left open by a dropped session is stored with what arrived (gateway-like).
        self.publish_on_drop = True
        self.rename_lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._transports: set[paramiko.Transport] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._s3: Any = None

    @property
    def s3(self) -> Any:
        if self._s3 is None:
            self._s3 = self.sandbox.s3_client()
        return self._s3

    def arrived(self, key: str, operation: str) -> None:
        """An object now stands under a name fileX takes (not a temporary one): an arrival."""
        from filex_agent.sandbox.processor import is_temporary

        if not is_temporary(key.rsplit("/", 1)[-1]):
            self.sandbox.record_arrival(key, operation)

    @property
    def known_hosts_line(self) -> str:
        return f"[{self.host}]:{self.port} {self.host_key.get_name()} {self.host_key.get_base64()}"

    def start(self) -> None:
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._want_port))
        sock.listen(16)
        sock.settimeout(0.5)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self.host_key_path.write_text(self.known_hosts_line + "\n")
        self._stopping.clear()
        self._thread = threading.Thread(target=self._accept_loop, name="sandbox-sftp", daemon=True)
        self._thread.start()
        log.info("sandbox sftp on %s:%d, host key %s", self.host, self.port, self.host_key_fingerprint)

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            try:
                self._serve(conn)
            except Exception:
                log.exception("sandbox sftp: connection setup failed")
                with contextlib.suppress(OSError):
                    conn.close()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(None)
        t = paramiko.Transport(conn)
        opts = t.get_security_options()
        opts.ciphers, opts.kex, opts.digests = CIPHERS, KEX, MACS
        t.add_server_key(self.host_key)
        t.set_subsystem_handler("sftp", _SftpSubsystem, _SftpFs)
        with self._lock:
            self._transports = {x for x in self._transports if x.is_active()}
            self._transports.add(t)
        # With an event, start_server returns at once and the handshake runs in the transport's
        # own thread, so a slow or silent client cannot stall the accept loop.
        t.start_server(event=threading.Event(), server=_Auth(self))

    def drop_connections(self) -> int:
        """Close every client connection abruptly (for tests of reconnects). Returns how many."""
        with self._lock:
            ts = list(self._transports)
            self._transports.clear()
        for t in ts:
            with contextlib.suppress(Exception):
                t.close()
        return len(ts)

    def stop(self) -> None:
        self._stopping.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.drop_connections()
        self._sock = None
        self._thread = None
