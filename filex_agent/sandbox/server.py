"""The sandbox's HTTP side: FIP + fileX REST (stdlib ``http.server``) and a guarded moto S3/STS.

The guard is a WSGI layer in front of moto that does what moto does not: it refuses expired
pre-signed URLs, expired STS credentials and, for credentials from ``/S3TransferTokens``, keys
outside the grant's read/write paths, and checks a PUT body against its ``Content-MD5`` (BadDigest),
with the same S3 error codes AWS uses.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import json
import logging
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Callable, Iterable, NoReturn
from urllib.parse import parse_qs, quote, unquote, urlsplit

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from moto.server import ThreadedMotoServer
from werkzeug.serving import make_server

from filex_agent.config import valid_remote_name
from filex_agent.sandbox.processor import is_temporary

if TYPE_CHECKING:
    from filex_agent.sandbox import Fault, Sandbox

log = logging.getLogger("filex_agent.sandbox.server")

SUB_SPACES = ("in", "out", "in_arcv")


@dataclass(frozen=True)
class S3Grant:
    """Temporary credentials handed out by ``/S3TransferTokens``; key prefixes exclude the bucket."""

    expires: datetime
    read_prefixes: tuple[str, ...]
    write_prefixes: tuple[str, ...]


# ====================================================================== moto + guard
class _QuietMotoHandler(MotoRequestHandler):
    # Werkzeug logs each request line, and a pre-signed URL's query string is a secret.
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        log.debug("s3 %s %s -> %s", self.command, urlsplit(self.path).path, code)


def _s3_error(start_response: Callable[..., Any], status: str, code: str, message: str,
              method: str) -> Iterable[bytes]:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<RequestId>{uuid.uuid4().hex[:16].upper()}</RequestId></Error>"
    ).encode()
    start_response(status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
    return [] if method == "HEAD" else [body]


def _credential(environ: dict[str, Any], qs: dict[str, list[str]]) -> tuple[str | None, str | None]:
    """(access key id, service) from a SigV4 header or a pre-signed query."""
    cred = (qs.get("X-Amz-Credential") or [None])[0]
    if cred is None:
        auth = environ.get("HTTP_AUTHORIZATION", "")
        if "Credential=" in auth:
            cred = auth.split("Credential=", 1)[1].split(",", 1)[0].strip()
    if not cred:
        return None, None
    parts = cred.split("/")
    return parts[0], (parts[3] if len(parts) > 3 else None)


def s3_operation(method: str, bucket: str, key: str, qs: dict[str, list[str]], environ: dict[str, Any]) -> str:
    """The S3 API operation a request is (as named in AWS's API reference and IAM docs)."""
    if not bucket:
        return "STS" if method == "POST" else "ListBuckets"
    if not key:
        if method == "GET":
            if "uploads" in qs:
                return "ListMultipartUploads"
            return "ListObjectsV2" if (qs.get("list-type") or [""])[0] == "2" else "ListObjects"
        if method == "HEAD":
            return "HeadBucket"
        if method == "POST" and "delete" in qs:
            return "DeleteObjects"
        return f"Bucket{method.title()}"
    copy = bool(environ.get("HTTP_X_AMZ_COPY_SOURCE"))
    if method == "PUT":
        if "partNumber" in qs and "uploadId" in qs:
            return "UploadPartCopy" if copy else "UploadPart"
        return "CopyObject" if copy else "PutObject"
    if method == "POST":
        if "uploads" in qs:
            return "CreateMultipartUpload"
        if "uploadId" in qs:
            return "CompleteMultipartUpload"
        return "PostObject"
    if method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in qs else "DeleteObject"
    if method == "GET":
        return "ListParts" if "uploadId" in qs else "GetObject"
    if method == "HEAD":
        return "HeadObject"
    return method


# What a transfer token may do, as the IAM actions a fileX bucket policy would grant. The reference's
# sample gives readPaths (in_arcv/, out/) and writePaths (in/) only, so:
# * read paths: s3:GetObject (GetObject, HeadObject) on the objects and s3:ListBucket with a prefix
#   inside them;
# * write paths: s3:PutObject (PutObject and the multipart trio Create/UploadPart/Complete, which
#   IAM authorises as PutObject) and s3:AbortMultipartUpload, so a client can clean up a failed
#   multipart upload. Nothing under in/ is readable: not GetObject/HeadObject, not a listing, and
#   not s3:ListMultipartUploadParts (ListParts) either — the reference never grants it and a
#   client must not learn from in/ what fileX has or has not taken (be strict where unsure);
# * everything else (DeleteObject, CopyObject, UploadPartCopy, ListMultipartUploads, other
#   buckets) is refused. HeadBucket stays allowed: SDKs probe the bucket and it reveals nothing.
_READ_OPS = ("GetObject", "HeadObject")
_WRITE_OPS = ("PutObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload", "AbortMultipartUpload")
_LIST_OPS = ("ListObjects", "ListObjectsV2")


class S3Guard:
    def __init__(self, sandbox: "Sandbox", app: Callable[..., Any]):
        self.sb = sandbox
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        qs = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        sig = (qs.get("X-Amz-Signature") or [None])[0]
        if sig is not None and self._presign_expired(sig, qs):
            return _s3_error(start_response, "403 Forbidden", "AccessDenied", "Request has expired", method)
        akid, service = _credential(environ, qs)
        grant = self.sb.s3_grant(akid) if akid else None
        path = environ.get("PATH_INFO", "/")
        try:  # werkzeug hands PATH_INFO over as latin-1 decoded bytes
            path = path.encode("latin-1").decode("utf-8")
        except UnicodeError:
            pass
        bucket, _, key = path.lstrip("/").partition("/")
        operation = s3_operation(method, bucket, key, qs, environ)
        if sig is not None and self.sb.presigned_for(sig) != (method, key):
            # The signature covers method and key: a PUT URL cannot GET, HEAD or write elsewhere.
            return _s3_error(start_response, "403 Forbidden", "SignatureDoesNotMatch",
                             "The request signature we calculated does not match the signature you provided.",
                             method)
        # Pre-signed URLs are signed with the admin key but used by clients; the sandbox's own
        # calls (processor, STS) never get faults and are no arrivals.
        client = sig is not None or akid != self.sb.admin_access_key
        corrupt = False
        after: Fault | None = None
        if client:
            for fault in self.sb.take_faults(path, target="s3", method=method, operation=operation):
                if fault.after:
                    after = fault
                elif fault.kind == "corrupt":
                    corrupt = True
                elif fault.kind == "slow":
                    time.sleep(fault.seconds)
                elif fault.kind == "drop":
                    _drop(environ)
                elif fault.kind == "status":
                    return _fault_error(start_response, fault, method)
        if grant is not None and service in (None, "s3"):
            if datetime.now(timezone.utc) >= grant.expires:
                return _s3_error(start_response, "400 Bad Request", "ExpiredToken",
                                 "The provided token has expired.", method)
            if not self._allowed(grant, operation, bucket, key, qs):
                return _s3_error(start_response, "403 Forbidden", "AccessDenied", "Access Denied", method)
        if method == "PUT" and (corrupt or environ.get("HTTP_CONTENT_MD5")):
            refused = _check_body(environ, corrupt)
            if refused:
                return _s3_error(start_response, "400 Bad Request", refused[0], refused[1], method)

        status_box: list[str] = []

        def _start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            status_box.append(status)
            if after is not None:  # the answer is lost: moto's status and headers never leave
                return lambda data: None
            return start_response(status, headers, exc_info) if exc_info else start_response(status, headers)

        result = self.app(environ, _start)
        if after is not None:
            # Let moto finish the request (the object is stored) before the answer is lost.
            try:
                for _ in result:
                    pass
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        ok = bool(status_box) and status_box[0].startswith("200")
        if sig is not None and method == "PUT" and key and ok:
            self.sb.note_presigned_put(key, sig)
        if client and ok and _is_in_key(key) and operation in ("PutObject", "CompleteMultipartUpload"):
            self.sb.record_arrival(key, operation)
        if after is not None:
            log.info("fault: %s %s took effect (%s), answer lost (%s)", operation, key,
                     status_box[0] if status_box else "?", after.kind)
            if after.kind == "drop":
                _drop(environ)
            return _fault_error(start_response, after, method)
        return result

    def _presign_expired(self, sig: str, qs: dict[str, list[str]]) -> bool:
        if self.sb.signature_expired(sig):
            return True
        try:
            signed = datetime.strptime(qs["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
            seconds = int(qs["X-Amz-Expires"][0])
        except (KeyError, IndexError, ValueError):
            return False
        return datetime.now(timezone.utc) > signed + timedelta(seconds=seconds)

    def _allowed(self, grant: S3Grant, operation: str, bucket: str, key: str, qs: dict[str, list[str]]) -> bool:
        """Whether a transfer token may do this (see the policy above _READ_OPS)."""
        if bucket != self.sb.bucket:
            return False
        if operation == "HeadBucket":
            return True
        if operation in _LIST_OPS:
            return (qs.get("prefix") or [""])[0].startswith(grant.read_prefixes)
        if operation in _READ_OPS:
            return key.startswith(grant.read_prefixes)
        if operation in _WRITE_OPS:
            return key.startswith(grant.write_prefixes)
        return False


def _fault_error(start_response: Callable[..., Any], fault: "Fault", method: str) -> Iterable[bytes]:
    code = {500: "InternalError", 503: "SlowDown"}.get(fault.status, "ServiceUnavailable")
    return _s3_error(start_response, f"{fault.status} {HTTPStatus(fault.status).phrase}", code,
                     "injected fault", method)


def _drop(environ: dict[str, Any]) -> NoReturn:
    """Close the client's connection without an answer; werkzeug takes ConnectionError as a drop."""
    sock = environ.get("werkzeug.socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    raise ConnectionAbortedError("injected fault: connection dropped")


def _check_body(environ: dict[str, Any], corrupt: bool) -> tuple[str, str] | None:
    """Like S3: refuse a PUT body that does not match its Content-MD5; None when it matches.

    ``corrupt`` flips one byte first, as a bad link or proxy would. The body is buffered, then
    handed on to moto, which buffers it anyway.
    """
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    body = environ["wsgi.input"].read(length) if length > 0 else b""
    if corrupt and body:
        body = bytes([body[0] ^ 0xFF]) + body[1:]
    environ["wsgi.input"] = io.BytesIO(body)
    claimed = environ.get("HTTP_CONTENT_MD5")
    if not claimed:
        return None
    try:
        want = base64.b64decode(claimed, validate=True)
    except (binascii.Error, ValueError):
        want = b""
    if len(want) != 16:
        return "InvalidDigest", "The Content-MD5 you specified was invalid."
    if hashlib.md5(body, usedforsecurity=False).digest() != want:
        return "BadDigest", "The Content-MD5 you specified did not match what we received."
    return None


def _is_in_key(key: str) -> bool:
    parts = key.split("/", 3)
    return len(parts) == 4 and parts[2] == "in" and bool(parts[3])


class GuardedMotoServer(ThreadedMotoServer):
    """moto's threaded server on 127.0.0.1, a free port, with the S3 guard in front."""

    def __init__(self, sandbox: "Sandbox"):
        from filex_agent.sandbox import moto_fixes

        moto_fixes.apply()  # ETags computed under the key's lock, as S3 fixes them at write
        super().__init__(ip_address="127.0.0.1", port=0, verbose=False)
        self._sandbox = sandbox

    def _server_entry(self) -> None:
        app = S3Guard(self._sandbox, DomainDispatcherApplication(create_backend_app))
        self._server = make_server(self._ip_address, self._port, app, True, request_handler=_QuietMotoHandler)
        self._server_ready_event.set()
        self._server.serve_forever()

    @property
    def port(self) -> int:
        return self.get_host_and_port()[1]

    def stop(self) -> None:
        super().stop()
        if self._server is not None:
            self._server.server_close()


# ====================================================================== fileX REST + FIP
class _HttpError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None,
                 body: dict[str, Any] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.body = body


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    sandbox: "Sandbox"

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        # A client killed mid-request (the chaos test SIGKILLs the agent) is no sandbox error.
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            log.debug("client %s went away", client_address)
            return
        super().handle_error(request, client_address)


def _retry_after(fault: "Fault") -> dict[str, str]:
    if fault.retry_after is None:
        return {}
    ra = fault.retry_after
    return {"Retry-After": str(int(ra) if ra == int(ra) else ra)}


class ApiServer:
    def __init__(self, sandbox: "Sandbox"):
        self.sb = sandbox
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.sandbox = sandbox
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="sandbox-api", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive for httpx clients
    server_version = "filex-sandbox/1"
    timeout = 60  # an idle keep-alive connection must not hold a thread forever
    _swallow = False  # set while an "after" fault lets a request run without answering it

    def log_message(self, format: str, *args: Any) -> None:
        # Never the query string or headers (tokens); path only.
        log.debug("api %s %s", self.command, urlsplit(self.path).path)

    # http.server dispatches on do_<METHOD>
    def do_GET(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    # ------------------------------------------------------------------ plumbing
    @property
    def sb(self) -> "Sandbox":
        return self.server.sandbox

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        if self._swallow:  # an "after" fault: this answer is lost
            return
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("FINRA-api-request-id", str(uuid.uuid4()))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, err: _HttpError) -> None:
        try:
            desc = HTTPStatus(err.status).phrase
        except ValueError:
            desc = "Error"
        payload = err.body or {
            "statusCode": err.status,
            "statusDescription": desc,
            "requestId": str(uuid.uuid4()),
            "message": err.message,
        }
        self._send(err.status, payload, err.headers)

    def _handle(self) -> None:
        split = urlsplit(self.path)
        path = split.path
        query = parse_qs(split.query, keep_blank_values=True)
        after: Fault | None = None
        try:
            body = self._read_body()
            if path.startswith("/_sandbox/"):
                self._admin(path, body)
                return
            for fault in self.sb.take_faults(path, target="api", method=self.command):
                if fault.after:
                    after = fault
                elif fault.kind == "slow":
                    time.sleep(fault.seconds)
                elif fault.kind == "garbage":
                    self._garbage(fault.body)
                    return
                elif fault.kind == "drop":
                    self._drop()
                    return
                elif fault.kind == "status":
                    raise _HttpError(fault.status, "injected fault", _retry_after(fault))
            # An "after" fault: the request takes effect (tracking record, URL...), its answer is lost.
            self._swallow = after is not None
            try:
                self._route(path, query)
            except _HttpError as err:
                if after is None:
                    raise
                self._error(err)
            finally:
                self._swallow = False
            if after is not None:
                log.info("fault: %s %s took effect, answer lost (%s)", self.command, path, after.kind)
                if after.kind == "drop":
                    self._drop()
                    return
                raise _HttpError(after.status, "injected fault", _retry_after(after))
        except _HttpError as err:
            self._error(err)
        except (BrokenPipeError, ConnectionResetError):
            # The client went away (killed mid-request, as the chaos test does): nothing to answer.
            self.close_connection = True
        except Exception as exc:  # a bug in the sandbox must show as 500, not a dropped connection
            log.exception("sandbox API error on %s %s", self.command, path)
            self._error(_HttpError(500, f"sandbox error: {type(exc).__name__}"))

    def _drop(self) -> None:
        """Close the connection without an answer."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _garbage(self, body: str | None) -> None:
        """A 200 whose body is not what the reference describes (JSON of the wrong shape by default)."""
        raw = (body if body is not None else json.dumps({"unexpected": True, "children": "not-a-list"})).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(raw)

    # ------------------------------------------------------------------ routes
    def _route(self, path: str, query: dict[str, list[str]]) -> None:
        if path == "/fip/rest/ews/oauth2/access_token":
            if self.command != "POST":
                raise _HttpError(405, "use POST")
            self._token(query)
            return
        self._authenticate()
        segs = [unquote(s) for s in path.split("/")[1:]]
        if segs and segs[-1] == "" and len(segs) > 1:
            segs = segs[:-1]
        head = segs[0] if segs else ""
        if head in ("files", "fileX"):
            self._files(segs[1:])
        elif head == "tracking" and len(segs) == 1:
            if self.command != "GET":
                raise _HttpError(405, "use GET")
            ids = query.get("id")
            self._send(200, self.sb.visible_tracking(ids[0] if ids else None))
        elif head == "S3TransferTokens" and len(segs) == 3:
            if self.command != "GET":
                raise _HttpError(405, "use GET")
            org, app = segs[1], segs[2]
            self._need_app(org, app)
            self._send(200, self.sb.issue_s3_tokens(org, app))
        else:
            raise _HttpError(404, "no such resource")

    def _token(self, query: dict[str, list[str]]) -> None:
        if (query.get("grant_type") or [""])[0] != "client_credentials":
            raise _HttpError(400, "grant_type must be client_credentials",
                             body={"error": "unsupported_grant_type",
                                   "error_description": "grant_type must be client_credentials"})
        auth = self.headers.get("Authorization", "")
        ok = False
        if auth.startswith("Basic "):
            try:
                cid, _, secret = base64.b64decode(auth[6:].strip(), validate=True).decode().partition(":")
                ok = self.sb.check_client(cid, secret)
            except (binascii.Error, UnicodeDecodeError):
                ok = False
        if not ok:
            raise _HttpError(401, "invalid client credentials",
                             body={"error": "invalid_client", "error_description": "Client authentication failed",
                                   "statusCode": 401, "statusDescription": "Unauthorized"})
        token = self.sb.issue_token()
        self._send(200, {"access_token": token, "token_type": "Bearer", "scope": "any",
                         "expires_in": str(self.sb.token_seconds)})

    def _authenticate(self) -> None:
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not self.sb.token_valid(auth[7:].strip()):
            raise _HttpError(401, "missing, invalid or expired access token",
                             {"WWW-Authenticate": 'Bearer error="invalid_token"'})

    def _need_org(self, org: str) -> None:
        state = self.sb.org_state(org)
        if state == 403:
            raise _HttpError(403, f"not entitled to org {org}")
        if state == 404:
            raise _HttpError(404, f"no org {org}")

    def _need_app(self, org: str, app: str) -> None:
        state = self.sb.app_state(org, app)
        if state == 403:
            raise _HttpError(403, f"not entitled to {org}/{app}")
        if state == 404:
            raise _HttpError(404, f"no application {org}/{app}")

    def _href(self, *parts: str) -> str:
        return self.sb.api_base_url + "/files" + "".join("/" + quote(p, safe="") for p in parts)

    def _dir(self, name: str, parts: list[str], children: list[dict[str, Any]], writable: bool = False) -> None:
        self._send(200, {
            "name": name,
            "type": "DIR",
            "metadata": {"writable": writable},
            "children": children,
            "_links": {
                "self": [{"href": self._href(*parts)}],
                "parent": [{"href": self._href(*parts[:-1])}],
                "children": [{"href": self._href(*parts, c["name"])} for c in children],
            },
        })

    def _files(self, segs: list[str]) -> None:
        n = len(segs)
        if self.command == "PUT":
            if n != 4:
                raise _HttpError(405, "PUT only on /files/{org}/{app}/in/{file}")
            self._put(*segs)
            return
        if self.command not in ("GET", "HEAD"):
            raise _HttpError(405, "method not allowed")
        if n == 0:
            orgs = sorted(self.sb.entitlements)
            self._send(200, {
                "name": "files", "type": "DIR", "metadata": {"writable": False},
                "children": [{"name": o, "type": "DIR", "metadata": {"writable": False}} for o in orgs],
                "_links": {"self": [{"href": self._href()}],
                           "children": [{"href": self._href(o)} for o in orgs]},
            })
            return
        org = segs[0]
        self._need_org(org)
        if n == 1:
            apps = self.sb.entitlements[org]
            self._dir(org, [org], [{"name": a, "type": "DIR", "metadata": {"writable": False}} for a in apps])
            return
        app = segs[1]
        self._need_app(org, app)
        if n == 2:
            self._dir(app, [org, app], [
                {"name": "out", "type": "DIR", "metadata": {"writable": False}},
                {"name": "in", "type": "DIR", "metadata": {"writable": True}},
                {"name": "in_arcv", "type": "DIR", "metadata": {"writable": False}},
            ])
            return
        sub = segs[2]
        if sub not in SUB_SPACES:
            raise _HttpError(404, f"no sub-space {sub}")
        if n == 3:
            self._dir(sub, [org, app, sub], self._list_files(f"{org}/{app}/{sub}/"), writable=(sub == "in"))
            return
        if n == 4:
            self._get_file(org, app, sub, segs[3])
            return
        raise _HttpError(404, "no such resource")

    def _list_files(self, prefix: str) -> list[dict[str, Any]]:
        from filex_agent.sandbox import iso

        out: list[dict[str, Any]] = []
        pages = self.sb.admin_s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.sb.bucket, Prefix=prefix, Delimiter="/")
        for page in pages:
            for obj in page.get("Contents", []):
                name = obj["Key"][len(prefix):]
                if not name:  # the folder marker
                    continue
                out.append({"name": name, "type": "FILE", "metadata": {
                    "writable": False, "contentLength": obj["Size"], "lastModified": iso(obj["LastModified"])}})
        return out

    def _get_file(self, org: str, app: str, sub: str, name: str) -> None:
        from botocore.exceptions import ClientError

        from filex_agent.sandbox import iso

        key = f"{org}/{app}/{sub}/{name}"
        try:
            self.sb.admin_s3.head_object(Bucket=self.sb.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise _HttpError(404, f"no file {sub}/{name}") from None
            raise
        url, expires = self.sb.presign("GET", key)
        self._send(200, {"url": url, "expirationTime": iso(expires)})

    def _put(self, org: str, app: str, sub: str, name: str) -> None:
        from filex_agent.sandbox import iso

        self._need_app(org, app)
        if sub not in SUB_SPACES:
            raise _HttpError(404, f"no sub-space {sub}")
        if sub != "in":
            raise _HttpError(403, f"sub-space {sub} is not writable")
        reason = valid_remote_name(name)
        if reason:
            raise _HttpError(400, reason)
        if is_temporary(name):
            # Never taken from in/ (see processor.is_temporary): say so now rather than leave a
            # record in "Request Received" for ever.
            raise _HttpError(400, "a name starting with '.' or ending in '.filepart' is never taken as a filing")
        rec = self.sb.new_tracking(org, app, name, transport="rest")
        url, expires = self.sb.presign("PUT", f"{org}/{app}/in/{name}", tracking_id=rec["trackingId"])
        self._send(200, {"url": url, "expirationTime": iso(expires), "trackingId": rec["trackingId"]})

    # ------------------------------------------------------------------ admin (tests)
    def _admin(self, path: str, body: bytes) -> None:
        if path == "/_sandbox/uploads" and self.command == "GET":
            self._send(200, [e.to_json() for e in self.sb.uploads()])
        elif path == "/_sandbox/arrivals" and self.command == "GET":
            self._send(200, [{"key": a.key, "operation": a.operation, "time": a.time.isoformat()}
                             for a in self.sb.arrivals()])
        elif path == "/_sandbox/tracking" and self.command == "GET":
            self._send(200, self.sb.tracking_records())
        elif path == "/_sandbox/faults" and self.command == "POST":
            try:
                spec = json.loads(body or b"{}")
                kind = spec.pop("kind")
                self.sb.inject_fault(kind, **spec)
            except (ValueError, KeyError, TypeError) as exc:
                raise _HttpError(400, f"bad fault: {exc}") from None
            self._send(200, {"ok": True})
        elif path == "/_sandbox/faults" and self.command == "DELETE":
            self.sb.clear_faults()
            self._send(200, {"ok": True})
        else:
            raise _HttpError(404, "no such admin resource")
