"""A local fake of FINRA fileX: FIP OAuth2, the fileX REST API, S3/STS (moto) and a processor.

Everything binds 127.0.0.1 on free ports. Nothing here needs FINRA credentials::

    with Sandbox(tmp_path) as sb:
        httpx.post(sb.fip_token_url, auth=(sb.client_id, sb.client_secret), ...)

State lives in memory and in the moto bucket; ``data_dir`` only receives ``uploads.jsonl`` and logs.

As strict as fileX's documents, never more lenient: a transfer token from ``/S3TransferTokens``
may write (PutObject, multipart, abort) under ``in/`` but not read, head or list it; it reads and
lists ``out/`` and ``in_arcv/`` only. A pre-signed URL does only the method and key it was signed
for. A name starting with ``.`` or ending in ``.filepart`` is never taken as a filing (the SFTP
temporary-name convention the agent relies on; the reference is silent). ``uploads()`` has one
entry per object fileX took from ``in/`` (size, sha256); the object is then archived to
``in_arcv/{stem}_{trackingId}{suffix}`` and its record gets ``submissionTime`` (when it was taken),
``fileSize`` and ``uploadLocation``.

Faults (``inject_fault(kind, **kw)`` or ``POST /_sandbox/faults`` with ``{"kind": ..., ...}``;
``count`` uses, ``path_prefix``, ``method`` (HTTP) and ``operation`` narrow which requests):

* target ``api`` (FIP + fileX REST): ``status`` (``status``, ``retry_after``), ``slow``
  (``seconds``), ``garbage`` (a 200 with ``body``), ``drop`` (connection closed, no answer);
* target ``s3`` (S3 direct and pre-signed URLs): ``status``, ``slow``, ``drop``, ``corrupt`` (one
  flipped byte in a PUT body); ``operation`` is the S3 name (``PutObject``, ``UploadPart``,
  ``CompleteMultipartUpload``, ``GetObject``, ...; see ``server.s3_operation``);
* target ``sftp``: ``drop`` kills the SSH session, ``slow``; ``operation`` is one of ``open``,
  ``write``, ``close``, ``rename``, ``remove``, ``stat``, ``list``;
* ``after=True`` (``status``/``drop``): the request takes effect first (the object is stored, the
  tracking record and URL are created, the SFTP close/rename is done) and then the answer is lost:
  a 5xx, or the connection closed without one. Without it, nothing happens;
* ``receive_lag`` (``seconds``, also ``Sandbox(receive_lag=)``): fileX takes an object only that
  long after it first appeared in ``in/``; until then it stays there, a REST record stays
  "Request Received" and S3/SFTP uploads have no record;
* ``revoke_tokens``, ``presign_expire_now``, ``s3_creds_expire_now`` (``count``).
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

import boto3
from botocore.config import Config as BotoConfig

from filex_agent.sandbox.processor import Processor
from filex_agent.sandbox.server import ApiServer, GuardedMotoServer, S3Grant

__all__ = ["Arrival", "Sandbox", "UploadLogEntry"]

log = logging.getLogger("filex_agent.sandbox")

REGION = "us-east-1"
SUB_SPACES = ("in", "out", "in_arcv")
# Moto's STS refuses shorter sessions; the sandbox enforces its own (shorter) expiry in the guard.
_STS_MIN_SECONDS = 900
_STS_MAX_SECONDS = 129600

try:  # fileX answers in US Eastern time with an offset; it exercises offset parsing in clients.
    from zoneinfo import ZoneInfo

    _TZ: Any = ZoneInfo("America/New_York")
except Exception:  # pragma: no cover - no tz database
    _TZ = timezone.utc


def now() -> datetime:
    return datetime.now(_TZ)


def iso(dt: datetime | None) -> str | None:
    """``2025-08-22T17:29:58.000-04:00`` like fileX (milliseconds, offset with a colon)."""
    if dt is None:
        return None
    return dt.astimezone(_TZ).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class UploadLogEntry:
    """One filing: an object fileX took from some ``{org}/{app}/in/`` (``time``: when it took it,
    which is also the record's ``submissionTime``). Two entries for one name are a double filing."""

    key: str
    org: str
    application: str
    name: str
    size: int
    sha256: str
    transport: str  # "rest" | "s3" | "sftp"
    time: datetime
    tracking_id: str

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["time"] = iso(self.time)
        return d


@dataclass
class Fault:
    kind: str
    count: int = 1
    status: int = 503
    retry_after: float | None = None
    seconds: float = 0.0
    path_prefix: str | None = None
    # "api" (FIP + fileX REST), "s3" (the S3 endpoint: pre-signed URLs and S3 direct) or "sftp".
    target: str = "api"
    # kind "garbage": the 200 body sent instead of the real answer.
    body: str | None = None
    # status/drop: let the request take effect first, then lose the answer.
    after: bool = False
    # Only requests with this HTTP method (api, s3).
    method: str | None = None
    # Only this operation: an S3 operation name (see server.s3_operation) or an SFTP one
    # (open, write, close, rename, remove, stat, list).
    operation: str | None = None


# Which kinds each target knows; "status"/"garbage"/"drop" end a request (at most one per request).
_FAULT_KINDS = {
    "api": {"status", "slow", "garbage", "drop"},
    "s3": {"status", "slow", "corrupt", "drop"},
    "sftp": {"drop", "slow"},
}
_TERMINAL = ("status", "garbage", "drop")
SFTP_OPERATIONS = ("open", "write", "close", "rename", "remove", "stat", "list")


@dataclass(frozen=True)
class Arrival:
    """An object written into some ``{org}/{app}/in/`` by a client, as the server stored it: through
    the S3 endpoint (PutObject or CompleteMultipartUpload answered 200, or would have but for an
    ``after`` fault) or SFTP (a close or a rename onto a name that is not temporary) — before the
    processor moves it on, so two uploads of one name in quick succession are two arrivals even if
    the processor sees one."""

    key: str
    operation: str
    time: datetime


class Sandbox:
    """The whole fake fileX; ``start()``/``stop()`` or use it as a context manager."""

    def __init__(
        self,
        data_dir: Path,
        *,
        processing_delay: float = 0.5,
        token_seconds: int = 3600,
        s3_credential_seconds: int = 3600,
        sftp: bool = False,
        receive_lag: float = 0.0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.processing_delay = processing_delay
        # fileX takes an object from in/ only this many seconds after it was stored (changeable at
        # run time with the "receive_lag" fault); until then it stays in in/ with no (final) record.
        self.receive_lag = self._initial_receive_lag = float(receive_lag)
        self.token_seconds = token_seconds
        self.s3_credential_seconds = s3_credential_seconds
        self.presign_seconds = 900
        self.region = REGION
        # Unique per instance: moto's backends are process-global, two sandboxes must not share a bucket.
        self.bucket = f"sandbox-filex-{secrets.token_hex(4)}"
        self.client_id = "sandbox-client"
        self.client_secret = secrets.token_urlsafe(24)
        self.sftp_username = "sandbox-prime"
        self.sftp_password = secrets.token_urlsafe(18)
        self.entitlements: dict[str, list[str]] = {"0001": ["app1", "app2"], "0002": ["app1"]}
        # Exists in the bucket, but this login is not entitled to it (403, not 404).
        self.unentitled: dict[str, list[str]] = {"0003": ["app1"]}
        self.admin_access_key = "sandbox-admin"
        self.admin_secret_key = "sandbox-admin-secret"

        self.token_requests = 0
        self.s3_token_requests = 0
        self.sftp: Any = None
        self._want_sftp = sftp

        self._lock = threading.RLock()
        self._tokens: dict[str, datetime] = {}
        self._tracking: dict[str, dict[str, Any]] = {}
        self._uploads: list[UploadLogEntry] = []
        self._faults: list[Fault] = []
        self._arrivals: list[Arrival] = []
        self._presign_expire_count = 0
        self._s3_creds_expire_count = 0
        # Signature of an issued pre-signed PUT URL -> tracking id; the S3 guard reports which URL was used.
        self._presigned_puts: dict[str, str] = {}
        # Signature of every issued pre-signed URL -> (method, key): moto checks no signatures, so
        # the guard refuses a URL used for another method or key, as S3 would (SignatureDoesNotMatch).
        self._presigned: dict[str, tuple[str, str]] = {}
        self._expired_signatures: set[str] = set()
        self._put_via_url: dict[str, str] = {}
        self._s3_grants: dict[str, S3Grant] = {}

        self._moto: GuardedMotoServer | None = None
        self._api: ApiServer | None = None
        self._processor: Processor | None = None
        self._started = False
        self._log_handler: logging.Handler | None = None
        self._admin_s3: Any = None
        self._presign_s3: Any = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Sandbox":
        if self._started:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log_handler = logging.FileHandler(self.data_dir / "sandbox.log", encoding="utf-8")
        self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(self._log_handler)
        if log.level == logging.NOTSET or log.level > logging.INFO:
            log.setLevel(logging.INFO)
        try:
            self._moto = GuardedMotoServer(self)
            self._moto.start()
            self._init_bucket()
            self._api = ApiServer(self)
            self._api.start()
            self._processor = Processor(self)
            self._processor.start()
            self._started = True
            if self._want_sftp:
                # Imported only on demand: sftp=False must not load paramiko's server code.
                from filex_agent.sandbox.sftp_server import SandboxSftpServer

                self.sftp = SandboxSftpServer(self)
                self.sftp.start()
        except BaseException:
            self.stop()
            raise
        log.info("sandbox started: api %s, s3 %s, bucket %s", self.api_base_url, self.s3_endpoint_url, self.bucket)
        return self

    def stop(self) -> None:
        if self.sftp is not None:
            try:
                self.sftp.stop()
            except Exception:
                log.exception("stopping the SFTP server failed")
            self.sftp = None
        if self._processor is not None:
            self._processor.stop()
            self._processor = None
        if self._api is not None:
            self._api.stop()
            self._api = None
        if self._moto is not None:
            self._drop_bucket()
            self._moto.stop()
            self._moto = None
            self._admin_s3 = None
            self._presign_s3 = None
        if self._log_handler is not None:
            log.removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None
        self._started = False

    def __enter__(self) -> "Sandbox":
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:  # never the secrets
        return f"Sandbox(api={self.api_base_url if self._api else None!r}, bucket={self.bucket!r})"

    # ------------------------------------------------------------------ URLs and clients
    @property
    def api_base_url(self) -> str:
        assert self._api is not None, "start() first"
        return f"http://127.0.0.1:{self._api.port}"

    @property
    def fip_token_url(self) -> str:
        return f"{self.api_base_url}/fip/rest/ews/oauth2/access_token"

    @property
    def s3_endpoint_url(self) -> str:
        assert self._moto is not None, "start() first"
        return f"http://127.0.0.1:{self._moto.port}"

    def s3_client(self) -> Any:
        """boto3 S3 client with admin credentials (no path restrictions)."""
        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.admin_access_key,
            aws_secret_access_key=self.admin_secret_key,
            config=BotoConfig(
                signature_version="s3v4",
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
            ),
        )

    @property
    def admin_s3(self) -> Any:
        """One shared admin client for the sandbox's own calls (boto3 clients are thread-safe)."""
        with self._lock:
            if self._admin_s3 is None:
                self._admin_s3 = self.s3_client()
            return self._admin_s3

    @property
    def _presigner(self) -> Any:
        """A client whose pre-signed PUT URLs carry a nonce: two URLs for one key within the same
        second would otherwise be identical, and the guard tells submissions apart by signature."""
        with self._lock:
            if self._presign_s3 is None:
                client = self.s3_client()

                def _nonce(request: Any, **_: Any) -> None:
                    sep = "&" if "?" in request.url else "?"
                    request.url += f"{sep}x-filex-request={uuid.uuid4().hex}"

                client.meta.events.register("before-sign.s3.PutObject", _nonce)
                self._presign_s3 = client
            return self._presign_s3

    def _sts_client(self) -> Any:
        return boto3.client(
            "sts",
            endpoint_url=self.s3_endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.admin_access_key,
            aws_secret_access_key=self.admin_secret_key,
            config=BotoConfig(connect_timeout=5, read_timeout=30),
        )

    def _init_bucket(self) -> None:
        s3 = self.admin_s3
        s3.create_bucket(Bucket=self.bucket)
        # Folder markers make every org/app/sub-space exist in the listing, even when empty.
        for orgs in (self.entitlements, self.unentitled):
            for org, apps in orgs.items():
                for app in apps:
                    for sub in SUB_SPACES:
                        s3.put_object(Bucket=self.bucket, Key=f"{org}/{app}/{sub}/", Body=b"")

    def _drop_bucket(self) -> None:
        # Moto keeps objects (spooled to temp files) for the life of the process: free them.
        try:
            s3 = self.admin_s3
            pages = s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
            for page in pages:
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    s3.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
            s3.delete_bucket(Bucket=self.bucket)
        except Exception as exc:  # best effort at shutdown
            log.warning("could not empty the sandbox bucket: %s", type(exc).__name__)

    # ------------------------------------------------------------------ FIP tokens
    def check_client(self, client_id: str, client_secret: str) -> bool:
        return secrets.compare_digest(client_id, self.client_id) and secrets.compare_digest(
            client_secret, self.client_secret
        )

    def issue_token(self) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = now() + timedelta(seconds=self.token_seconds)
            self.token_requests += 1
        return token

    def token_valid(self, token: str) -> bool:
        with self._lock:
            exp = self._tokens.get(token)
            if exp is None:
                return False
            if now() >= exp:
                del self._tokens[token]
                return False
            return True

    # ------------------------------------------------------------------ entitlements
    def org_state(self, org: str) -> int:
        """200 entitled, 403 exists but not entitled, 404 unknown."""
        if org in self.entitlements:
            return 200
        return 403 if org in self.unentitled else 404

    def app_state(self, org: str, app: str) -> int:
        state = self.org_state(org)
        if state != 200:
            return state
        if app in self.entitlements[org]:
            return 200
        return 403 if app in self.unentitled.get(org, []) else 404

    def entitled(self, org: str, app: str) -> bool:
        return app in self.entitlements.get(org, [])

    # ------------------------------------------------------------------ tracking
    def new_tracking(
        self, org: str, app: str, name: str, *, transport: str, user: str | None = None,
        tracking_id: str | None = None,
    ) -> dict[str, Any]:
        tid = tracking_id or str(uuid.uuid4())
        rec: dict[str, Any] = {
            "trackingId": tid,
            "submissionTime": None,
            "userName": user or self.client_id,
            "fileName": name,
            "status": "Request Received",
            "downstreamStatus": None,
            "statusUpdatedTime": iso(now()),
            "fileSize": 0,
            "uploadLocation": f"{org}/{app}/in",
            "applicationName": app,
            "applicationSpaceName": "in",
            "arcvFileName": None,
            "downloadable": False,
            "_org": org,
            "_transport": transport,
            "_created": now(),
        }
        with self._lock:
            self._tracking[tid] = rec
        return rec

    def _public(self, rec: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in rec.items() if not k.startswith("_")}
        base = self.api_base_url if self._api else ""
        out["_links"] = [
            {"rel": "self", "href": f"{base}/tracking?id={rec['trackingId']}"},
            {"rel": "parent", "href": f"{base}/tracking"},
        ]
        return out

    def tracking_records(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self._public(r) for r in self._tracking.values()]

    def visible_tracking(self, tracking_id: str | None) -> list[dict[str, Any]]:
        """What ``GET /tracking[?id=]`` shows this login: entitled orgs, last 90 days."""
        horizon = now() - timedelta(days=90)
        with self._lock:
            recs = [self._tracking[tracking_id]] if tracking_id in self._tracking else (
                [] if tracking_id is not None else list(self._tracking.values()))
            return [self._public(r) for r in recs
                    if self.entitled(r["_org"], r["applicationName"]) and r["_created"] >= horizon]

    def update_tracking(self, tid: str, **fields: Any) -> None:
        with self._lock:
            rec = self._tracking[tid]
            rec.update(fields)
            rec["statusUpdatedTime"] = iso(now())

    def tracking(self, tid: str) -> dict[str, Any] | None:
        with self._lock:
            rec = self._tracking.get(tid)
            return dict(rec) if rec else None

    # ------------------------------------------------------------------ pre-signed URLs
    def presign(self, method: str, key: str, tracking_id: str | None = None) -> tuple[str, datetime]:
        with self._lock:
            expire_now = self._presign_expire_count > 0
            if expire_now:
                self._presign_expire_count -= 1
        seconds = 1 if expire_now else self.presign_seconds
        op = "put_object" if method == "PUT" else "get_object"
        url: str = self._presigner.generate_presigned_url(
            op, Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=seconds
        )
        sig = _query_param(url, "X-Amz-Signature") or ""
        with self._lock:
            self._presigned[sig] = (method, key)
            if expire_now:
                # A 1 s URL could still work for a moment; the guard refuses this one at once.
                self._expired_signatures.add(sig)
            if tracking_id is not None:
                self._presigned_puts[sig] = tracking_id
        expires = now() - timedelta(seconds=1) if expire_now else now() + timedelta(seconds=seconds)
        return url, expires

    def presigned_for(self, sig: str) -> tuple[str, str] | None:
        """(method, key) a pre-signed URL was issued for; None if the sandbox never issued it."""
        with self._lock:
            return self._presigned.get(sig)

    def signature_expired(self, sig: str) -> bool:
        with self._lock:
            return sig in self._expired_signatures

    def note_presigned_put(self, key: str, sig: str) -> None:
        """The guard saw a successful PUT through a pre-signed URL: remember which tracking id."""
        with self._lock:
            tid = self._presigned_puts.get(sig)
            if tid is not None:
                self._put_via_url[key] = tid

    def peek_put_tracking(self, key: str) -> str | None:
        with self._lock:
            return self._put_via_url.get(key)

    def pop_put_tracking(self, key: str) -> str | None:
        with self._lock:
            return self._put_via_url.pop(key, None)

    # ------------------------------------------------------------------ S3 transfer tokens
    def issue_s3_tokens(self, org: str, app: str) -> dict[str, Any]:
        with self._lock:
            expire_now = self._s3_creds_expire_count > 0
            if expire_now:
                self._s3_creds_expire_count -= 1
        session = f"filexuser{org}@{uuid.uuid4()}"
        duration = max(_STS_MIN_SECONDS, min(self.s3_credential_seconds, _STS_MAX_SECONDS))
        creds = self._sts_client().assume_role(
            RoleArn="arn:aws:iam::123456789012:role/filex-sandbox",
            RoleSessionName=session[:64].replace("@", "-"),
            DurationSeconds=duration,
        )["Credentials"]
        expires = now() - timedelta(seconds=1) if expire_now else now() + timedelta(
            seconds=self.s3_credential_seconds)
        read = [f"{self.bucket}/{org}/{app}/in_arcv/", f"{self.bucket}/{org}/{app}/out/"]
        write = [f"{self.bucket}/{org}/{app}/in/"]
        with self._lock:
            self._s3_grants[creds["AccessKeyId"]] = S3Grant(
                expires=expires,
                read_prefixes=tuple(p.split("/", 1)[1] for p in read),
                write_prefixes=tuple(p.split("/", 1)[1] for p in write),
            )
            self.s3_token_requests += 1
        return {
            "region": self.region,
            "sessionName": session,
            "readPaths": read,
            "writePaths": write,
            "credentials": {
                "accessKeyId": creds["AccessKeyId"],
                "secretAccessKey": creds["SecretAccessKey"],
                "sessionToken": creds["SessionToken"],
                "expiration": iso(expires),
            },
        }

    def s3_grant(self, access_key: str) -> S3Grant | None:
        with self._lock:
            return self._s3_grants.get(access_key)

    # ------------------------------------------------------------------ uploads
    def record_upload(self, entry: UploadLogEntry) -> None:
        with self._lock:
            self._uploads.append(entry)
            with open(self.data_dir / "uploads.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry.to_json()) + "\n")

    def uploads(self) -> list[UploadLogEntry]:
        with self._lock:
            return list(self._uploads)

    def record_arrival(self, key: str, operation: str) -> None:
        with self._lock:
            self._arrivals.append(Arrival(key=key, operation=operation, time=now()))

    def arrivals(self) -> list[Arrival]:
        with self._lock:
            return list(self._arrivals)

    # ------------------------------------------------------------------ faults
    def inject_fault(self, kind: str, **kw: Any) -> None:
        """Same as ``POST /_sandbox/faults`` with ``{"kind": kind, **kw}``. See the module docstring."""
        if kind == "revoke_tokens":
            with self._lock:
                self._tokens.clear()
            log.info("fault: every FIP token revoked")
            return
        if kind == "presign_expire_now":
            with self._lock:
                self._presign_expire_count += int(kw.get("count", 1))
            return
        if kind == "s3_creds_expire_now":
            with self._lock:
                self._s3_creds_expire_count += int(kw.get("count", 1))
            return
        if kind == "receive_lag":
            seconds = float(kw.get("seconds", 0.0))
            if seconds < 0:
                raise ValueError("seconds must be >= 0")
            self.receive_lag = seconds
            log.info("fault: receive lag now %.1f s", seconds)
            return
        target = str(kw.get("target", "api"))
        if target not in _FAULT_KINDS:
            raise ValueError("target must be 'api', 's3' or 'sftp'")
        if kind not in set().union(*_FAULT_KINDS.values()):
            raise ValueError(f"unknown fault kind {kind!r}")
        if kind not in _FAULT_KINDS[target]:
            fits = sorted(t for t, kinds in _FAULT_KINDS.items() if kind in kinds)
            raise ValueError(f"fault kind {kind!r} is for target {' or '.join(fits)}, not {target!r}")
        fault = Fault(
            kind=kind,
            count=int(kw.get("count", 1)),
            status=int(kw.get("status", 503)),
            retry_after=None if kw.get("retry_after") is None else float(kw["retry_after"]),
            seconds=float(kw.get("seconds", 0.0)),
            path_prefix=kw.get("path_prefix"),
            target=target,
            body=None if kw.get("body") is None else str(kw["body"]),
            after=bool(kw.get("after", False)),
            method=None if kw.get("method") is None else str(kw["method"]).upper(),
            operation=None if kw.get("operation") is None else str(kw["operation"]),
        )
        if fault.count < 1:
            raise ValueError("count must be >= 1")
        if fault.after and kind not in ("status", "drop"):
            raise ValueError("after=True is for kinds 'status' and 'drop' only")
        if target == "sftp" and fault.operation is not None and fault.operation not in SFTP_OPERATIONS:
            raise ValueError(f"sftp operation must be one of {', '.join(SFTP_OPERATIONS)}")
        with self._lock:
            self._faults.append(fault)
        log.info("fault armed: %s%s x%d on %s %s", kind, " after" if fault.after else "", fault.count, target,
                 fault.path_prefix or "every path")

    def clear_faults(self) -> None:
        """Disarm every fault; a receive lag set by a fault goes back to the constructor's."""
        with self._lock:
            self._faults.clear()
            self._presign_expire_count = 0
            self._s3_creds_expire_count = 0
            self.receive_lag = self._initial_receive_lag

    def take_faults(self, path: str, target: str = "api", method: str = "GET",
                    operation: str | None = None) -> list[Fault]:
        """Consume one use of each armed fault matching the request (the first status/garbage/drop
        fault wins, before or after alike: one request ends at most one way).

        A ``corrupt`` fault is only taken by a PUT (it flips a byte of the body)."""
        taken: list[Fault] = []
        with self._lock:
            have_terminal = False
            for f in list(self._faults):
                if f.target != target:
                    continue
                if f.path_prefix and not path.startswith(f.path_prefix):
                    continue
                if f.method and f.method != method:
                    continue
                if f.operation and f.operation != operation:
                    continue
                if f.kind == "corrupt" and method != "PUT":
                    continue
                if f.kind in _TERMINAL:
                    if have_terminal:
                        continue
                    have_terminal = True
                taken.append(f)
                f.count -= 1
                if f.count <= 0:
                    self._faults.remove(f)
        return taken


def _query_param(url: str, name: str) -> str | None:
    from urllib.parse import parse_qs, urlsplit

    vals = parse_qs(urlsplit(url).query).get(name)
    return vals[0] if vals else None
