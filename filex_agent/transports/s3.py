"""S3-direct transport: STS credentials from ``GET /S3TransferTokens/{org}/{app}``, boto3 managed
(multipart) transfers, credentials that refresh themselves before they expire.

fileX hands out one-hour STS credentials scoped to ``bucket/org/app/sub/`` paths. ``S3TokenCache``
keeps one set per (credential, org, app) for every worker and wraps it in botocore
``RefreshableCredentials`` so a long multipart upload or a daemon running for days asks fileX for
new ones before ``expiration`` instead of failing half-way.

Integrity rides on one MD5 of each byte (``_UploadWatch``): a part is hashed while it is sent and
checked against the ETag S3 gives it, a single PUT (and an SSE-KMS part) carries ``Content-MD5``,
and the object's ETag must match the digests. The local file is re-checked before every write, so
a file that changes aborts the upload before an object exists.

Secrets (secret key, session token) never reach a log line, an exception message or a repr: the
models hide them (``repr=False``) and every message here is built from error codes and names only.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, TypeVar

import boto3
import boto3.session
import botocore.session
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config as BotoConfig
from botocore.credentials import RefreshableCredentials
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ParamValidationError,
)
from s3transfer.subscribers import BaseSubscriber
from s3transfer.utils import OSUtils

from filex_agent.config import S3Settings, valid_remote_name
from filex_agent.errors import (
    CorruptFiling,
    AuthError,
    FilexError,
    NotEntitledError,
    PermanentError,
    RemoteChangedError,
    TransientError,
    UploadUnconfirmed,
)
from filex_agent.localfile import LocalFile, RangeReader, open_for_upload
from filex_agent.models import S3TransferTokens
from filex_agent.transports import ProgressFn, RemoteFile, Transport, UploadResult, register

log = logging.getLogger(__name__)

MIB = 1024 * 1024
_HASH_BLOCK = 1 * MIB
_DOWNLOAD_CHUNK = 1 * MIB

# S3 error codes meaning "these credentials are no good (any more)": fetch new ones once, retry once.
_CREDENTIAL_CODES = frozenset(
    {"ExpiredToken", "ExpiredTokenException", "InvalidAccessKeyId", "InvalidToken", "InvalidClientTokenId",
     "TokenRefreshRequired"}
)
_DENIED_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "AccountProblem", "Forbidden", "403"})
_TRANSIENT_CODES = frozenset(
    {"SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable",
     "Throttling", "ThrottlingException", "RequestLimitExceeded", "OperationAborted", "BadDigest",
     "IncompleteBody"}
)
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})

T = TypeVar("T")


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _aware(dt: datetime) -> datetime:
    # fileX sends offsets; a naive time is taken as UTC rather than local time.
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)


class S3TokenCache:
    """One set of STS credentials per (credential name, org, app), shared by all workers, thread-safe.

    ``fetch(org, app)`` is the fileX client's ``GET /S3TransferTokens/{org}/{app}``; its errors
    (NotEntitledError, AuthError, TransientError) propagate unchanged and nothing is cached.
    """

    def __init__(self, fetch: Callable[[str, str], S3TransferTokens], *, credential: str,
                 refresh_margin_seconds: float = 300):
        self._fetch = fetch
        self.credential = credential
        self.refresh_margin_seconds = float(refresh_margin_seconds)
        self._lock = threading.Lock()  # guards the dicts and the per-key lock table
        self._key_locks: dict[tuple[str, str], threading.Lock] = {}
        self._tokens: dict[tuple[str, str], S3TransferTokens] = {}
        self._creds: dict[tuple[str, str], RefreshableCredentials] = {}
        self.fetch_count = 0

    def __repr__(self) -> str:
        return f"S3TokenCache(credential={self.credential!r}, keys={sorted(self._tokens)!r})"

    def _key_lock(self, key: tuple[str, str]) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())

    def _stale(self, tokens: S3TransferTokens) -> bool:
        left = (_aware(tokens.credentials.expiration) - _utcnow()).total_seconds()
        return left <= self.refresh_margin_seconds

    def _get(self, org: str, app: str, newer_than: datetime | None = None) -> S3TransferTokens:
        """Cached tokens, fetched anew if within the margin of expiry or not newer than ``newer_than``."""
        key = (org, app)
        # One fetch per key at a time: concurrent callers wait for it instead of piling on fileX.
        with self._key_lock(key):
            tokens = self._tokens.get(key)
            if (tokens is None or self._stale(tokens)
                    or (newer_than is not None and _aware(tokens.credentials.expiration) <= newer_than)):
                log.debug("fetching S3 transfer tokens for org %s application %s (credential %s)",
                          org, app, self.credential)
                tokens = self._fetch(org, app)
                with self._lock:
                    self.fetch_count += 1
                    self._tokens[key] = tokens
            return tokens

    def get(self, org: str, app: str) -> S3TransferTokens:
        """Cached tokens; refetched when within ``refresh_margin_seconds`` of expiration."""
        return self._get(org, app)

    def invalidate(self, org: str, app: str, access_key_id: str | None = None) -> None:
        """Forget the tokens of (org, app) — only if they are still ``access_key_id`` when given.

        S3 refused them (ExpiredToken, InvalidAccessKeyId): the next ``get``/``session`` fetches new
        ones. The key check stops N workers that saw the same refusal from fetching N times.
        """
        key = (org, app)
        with self._key_lock(key):
            tokens = self._tokens.get(key)
            if tokens is None:
                return
            if access_key_id is not None and tokens.credentials.accessKeyId != access_key_id:
                return
            with self._lock:
                self._tokens.pop(key, None)
                self._creds.pop(key, None)

    def credentials(self, org: str, app: str) -> RefreshableCredentials:
        """The shared self-refreshing credentials object of (org, app)."""
        key = (org, app)
        with self._key_lock(key):
            creds = self._creds.get(key)
        if creds is not None:
            return creds
        tokens = self._get(org, app)
        current = {"expiration": _aware(tokens.credentials.expiration)}

        def refresh() -> dict[str, str]:
            # botocore calls this when its copy is within the margin; the cache may already hold
            # newer tokens (another worker refreshed, or invalidate() + refetch), else it fetches.
            fresh = self._get(org, app, newer_than=current["expiration"])
            current["expiration"] = _aware(fresh.credentials.expiration)
            return _metadata(fresh)

        margin = self.refresh_margin_seconds
        creds = RefreshableCredentials.create_from_metadata(
            metadata=_metadata(tokens),
            refresh_using=refresh,
            method="filex-s3-transfer-tokens",
            # Advisory: one thread refreshes while the others go on with the current set; mandatory
            # (half the margin): everyone waits for the new set.
            advisory_timeout=margin,
            mandatory_timeout=margin / 2,
        )
        with self._key_lock(key):
            # Another thread may have raced us here: keep the first so all share one object.
            return self._creds.setdefault(key, creds)

    def session(self, org: str, app: str) -> boto3.session.Session:
        """A boto3 session whose credentials refresh themselves through ``fetch``."""
        creds = self.credentials(org, app)
        tokens = self.get(org, app)
        core = botocore.session.get_session()
        # The documented-by-usage way to give a session a RefreshableCredentials object.
        core._credentials = creds  # noqa: SLF001
        return boto3.session.Session(botocore_session=core, region_name=tokens.region)


def _metadata(tokens: S3TransferTokens) -> dict[str, str]:
    c = tokens.credentials
    return {
        "access_key": c.accessKeyId,
        "secret_key": c.secretAccessKey,
        "token": c.sessionToken,
        "expiry_time": _aware(c.expiration).isoformat(),
    }


@dataclass(frozen=True)
class _Location:
    bucket: str
    prefix: str  # "org/app/sub/"
    sub: str


def _parse_path(path: str, org: str, app: str, what: str) -> _Location:
    parts = path.strip().strip("/").split("/")
    if len(parts) != 4 or not all(parts) or parts[1] != org or parts[2] != app:
        raise PermanentError(
            f"S3 transfer tokens for org {org} application {app}: {what} {path!r} is not "
            f"'bucket/{org}/{app}/<sub-space>/'"
        )
    return _Location(bucket=parts[0], prefix=f"{org}/{app}/{parts[3]}/", sub=parts[3])


class _Progress(BaseSubscriber):
    def __init__(self, fn: ProgressFn):
        self._fn = fn

    def on_progress(self, future, bytes_transferred: int, **kwargs) -> None:  # type: ignore[override]
        # s3transfer reports negative amounts when it rewinds a retried part; metrics counters
        # (prometheus) refuse to go down, so only forward progress is reported.
        if bytes_transferred > 0:
            self._fn(bytes_transferred)


@dataclass
class _Watched:
    """What the client's event hooks learn about one upload in flight."""

    # Raises RemoteChangedError when the local file is no longer what the upload started from.
    check: Callable[[], None]
    # The file being sent (for the sequential pass before CompleteMultipartUpload).
    local: LocalFile | None = None
    # Transport.on_commit: before every HTTP request of PutObject / CompleteMultipartUpload.
    on_commit: Callable[[], None] | None = None
    # SHA-256 of the bytes S3 has, once established (see _UploadWatch).
    sha256: str | None = None
    # Part number (0 for a single PutObject) -> (MD5 digest of the bytes sent, length).
    parts: dict[int, tuple[bytes, int]] = field(default_factory=dict)
    # Parts hashed while they are sent, checked against their UploadPart ETag.
    readers: dict[int, "_HashingReader"] = field(default_factory=dict)
    # Part number -> SHA-256 of the bytes sent (compared with a second, sequential read).
    part_sha: dict[int, bytes] = field(default_factory=dict)
    # SSE-KMS (said by CreateMultipartUpload): part ETags are no MD5, so parts carry Content-MD5.
    kms: bool = False
    etag: str = ""
    sse: str = ""

    @property
    def object_kms(self) -> bool:
        """The finished object is SSE-KMS encrypted: its ETag is no MD5 of the data."""
        return self.sse.startswith("aws:kms")


def _body_md5(body: object, sha: "hashlib._Hash | None" = None) -> tuple[bytes, int]:
    """(MD5 digest, length) of a request body, a file object read in blocks and rewound; ``sha``
    (if given) is fed the same bytes."""
    if isinstance(body, (bytes, bytearray)):
        if sha is not None:
            sha.update(body)
        return hashlib.md5(body, usedforsecurity=False).digest(), len(body)
    h = hashlib.md5(usedforsecurity=False)
    start = body.tell()  # type: ignore[attr-defined]
    n = 0
    while block := body.read(_HASH_BLOCK):  # type: ignore[attr-defined]
        h.update(block)
        if sha is not None:
            sha.update(block)
        n += len(block)
    body.seek(start)  # type: ignore[attr-defined]
    return h.digest(), n


class _HashingReader:
    """A part's body (s3transfer's ReadFileChunk) that MD5s (for the ETag) and SHA-256s (for the
    whole file's digest, see ``_sequential_sha256``) each byte the first time it is sent.

    botocore rewinds a body to resend it after a dropped connection; bytes below the high-water
    mark are not hashed twice. Everything else is the wrapped object's (length, s3transfer's
    progress signals).
    """

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._sha = hashlib.sha256()
        self._hashed = 0  # bytes [0, _hashed) of the body are in _md5
        self._gap = False  # a read began beyond _hashed: the digest would miss bytes

    def read(self, amount: int | None = None) -> bytes:
        pos = self._raw.tell()
        data = self._raw.read() if amount is None or amount < 0 else self._raw.read(amount)
        end = pos + len(data)
        if end > self._hashed:
            if pos > self._hashed:
                self._gap = True
            else:
                new = memoryview(data)[self._hashed - pos:]
                self._md5.update(new)
                self._sha.update(new)
            self._hashed = end
        return data

    def digest(self) -> tuple[bytes, int] | None:
        """(MD5, length) once every byte was read exactly in order at least once, else None."""
        if self._gap or self._hashed != len(self._raw):  # type: ignore[arg-type]
            return None
        return self._md5.digest(), self._hashed

    def sha256(self) -> bytes:
        return self._sha.digest()

    def seek(self, where: int, whence: int = 0) -> int:
        return self._raw.seek(where, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def __len__(self) -> int:
        return len(self._raw)  # type: ignore[arg-type]

    def __iter__(self):  # type: ignore[no-untyped-def]
        # As ReadFileChunk: http.client must read() the body, never iterate over it (bpo-17575).
        return iter([])

    def __getattr__(self, name: str) -> object:
        return getattr(self._raw, name)


class _UploadWatch:
    """botocore event hooks on the writes of watched keys (registered once per client).

    Integrity with one MD5 of each byte, and no SHA-256 of the payload on top of it (the client
    config turns payload signing off: over HTTPS, TLS protects the bytes in transit):

    - A single PutObject carries a ``Content-MD5``: S3 refuses a body that arrives different
      (BadDigest) before any object exists. SigV4 signs that header, binding the body to the
      signature.
    - A multipart part is hashed while it is sent, and its MD5 is compared with the ETag S3 gives
      that part (the MD5 of what S3 stored). A mismatch fails the upload, s3transfer aborts it, and
      no object is made of a corrupt part. This costs S3 nothing: the measured alternative,
      ``Content-MD5`` on every part, made the server hash every byte a second time. With SSE-KMS
      (part ETags are not MD5s, CreateMultipartUpload says so), parts carry ``Content-MD5``.
    - The digests give the ETag the finished object must have; it is taken from the write
      responses (PutObject / CompleteMultipartUpload), not from a HeadObject that fileX's
      write-only policy may deny.
    - Before each write, and last just before CompleteMultipartUpload, the local file is checked:
      a file that changed makes the call raise, s3transfer aborts the multipart upload, and no
      object is ever created from a half-old, half-new file.
    """

    _OPS = ("PutObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload")
    # The requests whose success makes the object (a filing): never re-sent blindly.
    _COMMITTING = ("PutObject", "CompleteMultipartUpload")
    _MARK = "filex_watch_key"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: dict[tuple[str, str], _Watched] = {}

    def attach(self, client) -> None:  # type: ignore[no-untyped-def]
        for op in self._OPS:
            client.meta.events.register(f"before-parameter-build.s3.{op}", self._mark)
            client.meta.events.register(f"after-call.s3.{op}", self._after_call)
        for op in ("PutObject", "UploadPart", "CompleteMultipartUpload"):
            client.meta.events.register(f"before-call.s3.{op}", self._before_call)
        for op in self._COMMITTING:
            # request-created: once per HTTP request, botocore's own retries included.
            client.meta.events.register(f"request-created.s3.{op}", self._committing)
            # First, so botocore's retry handler never sees an outcome that may have stored it.
            client.meta.events.register_first(f"needs-retry.s3.{op}", self._no_resend)

    @contextlib.contextmanager
    def watch(self, bucket: str, key: str, check: Callable[[], None], local: LocalFile | None = None,
              on_commit: Callable[[], None] | None = None) -> Iterator[_Watched]:
        box = _Watched(check=check, local=local, on_commit=on_commit)
        with self._lock:
            self._watched[(bucket, key)] = box
        try:
            yield box
        finally:
            with self._lock:
                self._watched.pop((bucket, key), None)

    def _box(self, context: dict) -> _Watched | None:
        mark = context.get(self._MARK)
        if mark is None:
            return None
        with self._lock:
            return self._watched.get(mark[:2])

    def _mark(self, params: dict, context: dict, **kwargs: object) -> None:
        context[self._MARK] = (params.get("Bucket"), params.get("Key"), int(params.get("PartNumber") or 0))

    def _before_call(self, model, params: dict, context: dict, **kwargs: object) -> None:  # type: ignore[no-untyped-def]
        box = self._box(context)
        body = params.get("body")
        headers = params.setdefault("headers", {})
        if model.name != "CompleteMultipartUpload" and body is not None and not any(
                h.lower() == "content-md5" for h in headers):
            part = context[self._MARK][2]
            if model.name == "UploadPart" and box is not None and not box.kms and hasattr(body, "read"):
                reader = _HashingReader(body)
                params["body"] = reader
                with self._lock:
                    box.readers[part] = reader
            else:
                # A whole PutObject: the same pass gives the SHA-256. Content-MD5 binds the bytes S3
                # stores to the bytes hashed here (a body read differently is refused: BadDigest).
                sha = hashlib.sha256() if box is not None else None
                digest, length = _body_md5(body, sha)
                headers["Content-MD5"] = base64.b64encode(digest).decode("ascii")
                if box is not None and sha is not None:
                    with self._lock:
                        box.parts[part] = (digest, length)
                        box.part_sha[part] = sha.digest()
                        if model.name == "PutObject":
                            box.sha256 = sha.hexdigest()
        if box is not None:
            box.check()  # after the MD5 pass: a change during it is caught too
            if model.name == "CompleteMultipartUpload":
                box.sha256 = _sequential_sha256(box)

    def _committing(self, request, **kwargs: object) -> None:  # type: ignore[no-untyped-def]
        box = self._box(request.context)
        if box is not None and box.on_commit is not None:
            box.on_commit()

    def _no_resend(self, response, caught_exception, request_dict: dict, operation, **kwargs: object):  # type: ignore[no-untyped-def]
        """needs-retry of PutObject / CompleteMultipartUpload: an outcome that may have made the
        object raises UploadUnconfirmed here, before botocore's retry handler could send it again.
        A refusal (4xx) or a connect failure (no byte sent) goes on to botocore's bounded retries."""
        context = request_dict.get("context") or {}
        box = self._box(context)
        if box is None:
            return None
        bucket, key, _ = context[self._MARK]
        what = f"S3 {operation.name} of s3://{bucket}/{key}"
        if caught_exception is not None:
            if isinstance(caught_exception, (EndpointConnectionError, ConnectTimeoutError)):
                return None  # the connection was never made
            body = request_dict.get("body")
            if operation.name == "PutObject" and hasattr(body, "tell") and hasattr(body, "__len__") and (
                    body.tell() < len(body)):  # type: ignore[union-attr, arg-type]
                return None  # the body was not all sent: S3 stores nothing from a short body
            raise UploadUnconfirmed(f"{what}: {type(caught_exception).__name__} after the request was sent; "
                                    "S3 may have stored it")
        if response is None:
            return None
        http, parsed = response
        if http.status_code >= 500 or (http.status_code < 300 and "Error" in parsed):
            # A 5xx (or CompleteMultipartUpload's 200 with an error inside) after S3 may have stored it.
            code = str((parsed.get("Error") or {}).get("Code", "")) or str(http.status_code)
            raise UploadUnconfirmed(f"{what}: {code} after the request was sent; S3 may have stored it")
        return None

    def _after_call(self, parsed: dict, model, context: dict, **kwargs: object) -> None:  # type: ignore[no-untyped-def]
        box = self._box(context)
        if box is None or "Error" in parsed:
            return
        sse = str(parsed.get("ServerSideEncryption") or "")
        if model.name == "CreateMultipartUpload":
            box.kms = sse.startswith("aws:kms")
            return
        etag = str(parsed.get("ETag", "")).strip('"')
        if model.name != "UploadPart":
            box.etag, box.sse = etag, sse
            return
        bucket, key, part = context[self._MARK]
        with self._lock:
            reader = box.readers.pop(part, None)
        if reader is None:
            return  # sent with Content-MD5: S3 checked it, and its digest is recorded
        got = reader.digest()
        if got is None:
            raise TransientError(f"part {part} of s3://{bucket}/{key} was not read whole and in order: its bytes "
                                 "could not be checked")
        if not sse.startswith("aws:kms") and etag != got[0].hex():
            raise TransientError(f"part {part} of s3://{bucket}/{key}: S3 stored ETag {etag}, the bytes sent have "
                                 f"MD5 {got[0].hex()}; upload aborted")
        with self._lock:
            box.parts[part] = got
            box.part_sha[part] = reader.sha256()


def _sequential_sha256(box: _Watched) -> str | None:
    """SHA-256 of the whole file as sent, for a multipart upload (parts go in parallel: no single
    pass hashes them as they are sent).

    Each part's SHA-256 was taken from the bytes sent (``_HashingReader``, or the Content-MD5
    pass of an SSE-KMS part). Here the file is read once more, in order, through the same
    descriptor: every part's SHA-256 must equal the one sent, and then the whole-file SHA-256 of
    this read is the SHA-256 of what S3 assembles. A difference means the file changed under a
    preserved size and mtime: RemoteChangedError before CompleteMultipartUpload, nothing filed.
    Cost, measured (2 cores, loaded, SHA-NI, page cache): ~0.5 s per GiB per SHA-256; this pass
    does two (~1 s/GiB) at the end, the per-part one runs in the part threads during the send.
    """
    lf = box.local
    if lf is None or not box.parts or 0 in box.parts or set(box.part_sha) != set(box.parts):
        return None
    whole = hashlib.sha256()
    offset = 0
    for number in sorted(box.parts):
        length = box.parts[number][1]
        part = hashlib.sha256()
        for block in lf.blocks(_HASH_BLOCK, offset, offset + length):
            part.update(block)
            whole.update(block)
        if part.digest() != box.part_sha[number]:
            raise RemoteChangedError(f"{lf.name}: part {number} read again differs from the bytes sent (the file "
                                     "changed during the upload); upload aborted")
        offset += length
    return whole.hexdigest() if offset == lf.size else None


class _SendProgress:
    """The body of a single PutObject (a ``RangeReader``): reports bytes to ``progress`` as they are
    sent, as s3transfer's ReadFileChunk did. Reads before ``sending`` (the Content-MD5 pass) and
    re-reads after botocore rewinds for a retry are not counted again."""

    def __init__(self, raw: RangeReader, progress: ProgressFn | None):
        self._raw = raw
        self._progress = progress
        self._reported = 0
        self.sending = False

    def read(self, amount: int | None = -1) -> bytes:
        data = self._raw.read(amount)
        if self.sending and self._progress is not None:
            end = self._raw.tell()
            if end > self._reported:
                self._progress(end - self._reported)
                self._reported = end
        return data

    def seek(self, where: int, whence: int = os.SEEK_SET) -> int:
        return self._raw.seek(where, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self._raw)

    def close(self) -> None:
        self._raw.close()


class _DescriptorOSUtils(OSUtils):
    """s3transfer's file access, on the one descriptor of a ``LocalFile``: s3transfer opens the
    upload source by name (once per part); here every open is a pread reader with its own
    position, so the path is never resolved again (a symlink swapped in is never followed)."""

    def __init__(self, lf: LocalFile):
        self._lf = lf
        self.source = str(lf.path)

    def _mine(self, filename: str) -> None:
        if filename != self.source:
            raise ValueError(f"{filename!r} is not the file being uploaded")

    def get_file_size(self, filename: str) -> int:
        self._mine(filename)
        return self._lf.size

    def open(self, filename: str, mode: str):  # type: ignore[no-untyped-def]
        self._mine(filename)
        if "r" not in mode or "+" in mode:
            raise ValueError("the upload source is read-only")
        return self._lf.reader()


def _integrity(written: _Watched) -> str:
    """How the bytes of a finished upload were checked, for the journal (detail["integrity"])."""
    how = "content-md5" if set(written.parts) == {0} or written.kms else "part-etag"
    return f"{how} (SSE-KMS: the ETag is not an MD5)" if written.object_kms else f"{how}+etag"


def _expected_etag(parts: dict[int, tuple[bytes, int]], size: int) -> str | None:
    """The ETag S3 gives an object made of exactly these parts, or None if they do not cover the file.

    One part (a PutObject, key 0): the hex MD5 of the bytes. Multipart: the MD5 of the parts'
    digests in order, a dash and the number of parts.
    """
    if set(parts) == {0}:
        digest, length = parts[0]
        return digest.hex() if length == size else None
    numbers = sorted(parts)
    if not numbers or numbers != list(range(1, len(numbers) + 1)) or sum(n for _, n in parts.values()) != size:
        return None
    combined = hashlib.md5(b"".join(parts[i][0] for i in numbers), usedforsecurity=False).hexdigest()
    return f"{combined}-{len(numbers)}"


@register("s3")
class S3Transport(Transport):
    """Upload to ``in/``, list and download ``out/`` with fileX's STS credentials."""
    reports_commit = True  # on_commit before each request that can make the filing

    def __init__(self, org: str, application: str, *, tokens: S3TokenCache, settings: S3Settings,
                 endpoint_url: str | None = None, verify: bool | str = True,
                 connect_timeout: float = 10, read_timeout: float = 60, max_attempts: int = 5):
        super().__init__(org, application)
        self._tokens = tokens
        self._settings = settings
        self._endpoint_url = endpoint_url
        self._verify = verify
        self._boto_config = BotoConfig(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            # Streamed bodies with trailing checksums and no length are refused by non-AWS S3
            # servers (MissingContentLength); _UploadWatch checks every byte by MD5 instead.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            # Pre-signed URLs for a custom endpoint would otherwise be SigV2.
            signature_version="s3v4",
            s3={
                # The MD5 checks cover every byte: no SHA-256 pass over the payload as well
                # (UNSIGNED-PAYLOAD, as botocore does over HTTPS when a checksum goes with a body).
                "payload_signing_enabled": False,
                **({"addressing_style": "path"} if endpoint_url else {}),
            },
            # The endpoint comes from our config only, never from AWS_ENDPOINT_URL* on the host.
            ignore_configured_endpoint_urls=True,
        )
        self._transfer_config = TransferConfig(
            multipart_threshold=settings.multipart_threshold_mb * MIB,
            multipart_chunksize=settings.part_size_mb * MIB,
            max_concurrency=settings.max_concurrency,
            use_threads=True,
            # Deterministic behaviour (and ETag arithmetic): never switch to the CRT client.
            preferred_transfer_client="classic",
        )
        self._lock = threading.Lock()
        self._client = None  # built lazily: constructing a transport must not call fileX
        self._client_creds: RefreshableCredentials | None = None
        self._writes = _UploadWatch()

    def __repr__(self) -> str:
        return f"S3Transport(org={self.org!r}, application={self.application!r})"

    # -- plumbing -------------------------------------------------------------------------------
    def _who(self) -> str:
        return f"org {self.org} application {self.application}"

    def _s3(self):
        with self._lock:
            creds = self._tokens.credentials(self.org, self.application)
            if self._client is None or creds is not self._client_creds:
                session = self._tokens.session(self.org, self.application)
                self._client = session.client(
                    "s3", endpoint_url=self._endpoint_url, verify=self._verify, config=self._boto_config
                )
                self._client_creds = session.get_credentials()
                self._writes.attach(self._client)
            return self._client

    def _write_location(self) -> _Location:
        tokens = self._tokens.get(self.org, self.application)
        if not tokens.writePaths:
            raise PermanentError(f"S3 transfer tokens for {self._who()} have no writePaths: not entitled to upload")
        return _parse_path(tokens.writePaths[0], self.org, self.application, "writePaths[0]")

    def _read_location(self) -> _Location:
        tokens = self._tokens.get(self.org, self.application)
        for p in tokens.readPaths:
            if p.strip().rstrip("/").endswith("/out"):
                return _parse_path(p, self.org, self.application, "readPaths entry")
        raise PermanentError(
            f"S3 transfer tokens for {self._who()} have no readPaths entry ending in out/ "
            f"(seen: {list(tokens.readPaths)!r})"
        )

    def _forget_credentials(self) -> None:
        with self._lock:
            creds = self._client_creds
        key_id = creds.get_frozen_credentials().access_key if creds is not None else None
        self._tokens.invalidate(self.org, self.application, access_key_id=key_id)

    def _map(self, exc: BaseException, action: str) -> FilexError:
        """Translate a boto error into the agent's taxonomy; messages carry codes, never secrets."""
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            msg = str(err.get("Message", ""))[:200]
            text = f"S3 {action} for {self._who()} failed: {code or status} {msg}".rstrip()
            if code in _CREDENTIAL_CODES:
                return AuthError(text + " (credentials refused again after a refetch)")
            if code in _DENIED_CODES or status == 403:
                return NotEntitledError(f"S3 {action} for {self._who()} denied ({code or status}): "
                                        f"not entitled to this application")
            if code in _TRANSIENT_CODES or (isinstance(status, int) and (status >= 500 or status == 429)):
                return TransientError(text)
            return PermanentError(text)
        if isinstance(exc, ParamValidationError):
            return PermanentError(f"S3 {action} for {self._who()}: invalid request: {exc}")
        if isinstance(exc, BotoCoreError):
            return TransientError(f"S3 {action} for {self._who()} failed: {type(exc).__name__}: {exc}")
        if isinstance(exc, OSError):
            return TransientError(f"S3 {action} for {self._who()} failed: {type(exc).__name__}: {exc}")
        raise exc

    def _with_credential_retry(self, action: str, fn: Callable[[], T]) -> T:
        """Run ``fn``; on a credential refusal refetch the tokens once and run it again."""
        for attempt in (1, 2):
            try:
                return fn()
            except FilexError:
                raise
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                # HEAD errors have no body: an expired or unknown token is a bare 400/403 there.
                bare = code in ("400", "403") and exc.operation_name == "HeadObject"
                if (code in _CREDENTIAL_CODES or bare) and attempt == 1:
                    log.warning("S3 %s for %s: credentials refused (%s); fetching new ones and retrying once",
                                action, self._who(), code)
                    self._forget_credentials()
                    continue
                raise self._map(exc, action) from exc
            except (BotoCoreError, OSError) as exc:
                raise self._map(exc, action) from exc
            except RuntimeError as exc:
                if "refreshed credentials are still expired" not in str(exc):
                    raise
                # botocore: fetch() returned credentials that are already expired.
                raise TransientError(f"S3 {action} for {self._who()}: fileX issued credentials that are already "
                                     "expired (is this machine's clock right?)") from exc
        raise AssertionError("unreachable")

    # -- Transport ------------------------------------------------------------------------------
    def upload(self, local: LocalFile | Path, remote_name: str, progress: ProgressFn | None = None, *,
               on_commit: Callable[[], None] | None = None,
               on_ticket: Callable[[str], None] | None = None) -> UploadResult:
        reason = valid_remote_name(remote_name)
        if reason:
            raise PermanentError(f"cannot upload {remote_name!r} for {self._who()}: {reason}")
        with open_for_upload(local) as lf:
            return self._upload(lf, remote_name, progress, self._hooks(on_commit, on_ticket)[0])

    def _upload(self, lf: LocalFile, remote_name: str, progress: ProgressFn | None,
                on_commit: Callable[[], None]) -> UploadResult:
        started = _utcnow()
        loc = self._write_location()
        key = loc.prefix + remote_name
        size = lf.size
        multipart = size >= self._transfer_config.multipart_threshold
        osutil = _DescriptorOSUtils(lf)

        def changed() -> bool:
            return lf.changed()

        def discarded() -> RemoteChangedError:
            return RemoteChangedError(f"upload of {lf.name} for {self._who()} discarded: local file changed "
                                      "during the upload")

        def check() -> None:
            # Called by the hooks before every write and before CompleteMultipartUpload.
            if changed():
                raise discarded()

        def attempt() -> _Watched:
            client = self._s3()
            if not multipart:
                # One PutObject on the shared client, as s3transfer sends a file below the threshold,
                # without building a TransferManager (and its thread pools) per file: for small files
                # that cost more than the request itself. The hooks give it the same Content-MD5,
                # SHA-256, on_commit and no-resend handling.
                body = _SendProgress(lf.reader(), progress)

                def committing() -> None:
                    on_commit()
                    body.sending = True  # the MD5 pass is over: reads from here on are the send

                with self._writes.watch(loc.bucket, key, check, lf, committing) as written:
                    client.put_object(Bucket=loc.bucket, Key=key, Body=body)
                return written
            with self._writes.watch(loc.bucket, key, check, lf, on_commit) as written:
                subscribers = [_Progress(progress)] if progress else None
                # A failed transfer aborts its multipart upload before result() raises (s3transfer
                # failure cleanups), so no partial object is ever left.
                with create_transfer_manager(client, self._transfer_config, osutil) as manager:
                    future = manager.upload(osutil.source, loc.bucket, key, subscribers=subscribers)
                    future.result()
            return written

        log.info("uploading %s to s3://%s/%s (%d bytes, %s) for %s", lf.name, loc.bucket, key, size,
                 "multipart" if multipart else "single part", self._who())
        try:
            written = self._with_credential_retry("upload", attempt)
        except (RemoteChangedError, UploadUnconfirmed):
            raise
        except FilexError:
            # e.g. BadDigest or a part ETag mismatch: bytes that changed on disk while being sent.
            if changed():
                raise discarded() from None
            raise
        if changed():
            # Only a change between the last check and CompleteMultipartUpload gets here.
            self._delete_bad_object(loc.bucket, key, "local file changed during the upload")
            raise discarded()
        etag = written.etag
        expected_etag = _expected_etag(written.parts, size)
        # With SSE-KMS the ETag is not an MD5 of the data: S3 checked each body's Content-MD5 instead
        # (parts get one when CreateMultipartUpload says SSE-KMS), the one check it allows without
        # a HeadObject that the write-only policy may deny.
        problem = None
        if not etag:
            problem = "S3 returned no ETag"
        elif expected_etag is None:
            problem = f"the parts sent do not cover the {size} bytes of the file"
        elif not written.object_kms and etag != expected_etag:
            problem = f"ETag {etag} does not match the expected {expected_etag}"
        if problem:
            self._delete_bad_object(loc.bucket, key, problem)
            raise TransientError(f"upload of {lf.name} for {self._who()} failed integrity check: {problem}; "
                                 "object deleted")
        finished = _utcnow()
        log.info("uploaded %s to s3://%s/%s (%d bytes, ETag %s) for %s", lf.name, loc.bucket, key, size,
                 etag, self._who())
        detail = {"etag": etag, "bucket": loc.bucket, "key": key,
                  "parts": str(etag.split("-")[1]) if "-" in etag else "1",
                  "integrity": _integrity(written)}
        if set(written.parts) == {0}:
            detail["md5"] = written.parts[0][0].hex()  # of the whole file: it went as one part
        return UploadResult(
            remote_name=remote_name,
            upload_location=loc.prefix.rstrip("/"),
            size=size,
            started_at=started,
            finished_at=finished,
            tracking_id=None,
            detail=detail,
            sent_sha256=written.sha256,
        )

    def _delete_bad_object(self, bucket: str, key: str, problem: str) -> None:
        try:
            self._with_credential_retry("delete", lambda: self._s3().delete_object(Bucket=bucket, Key=key))
        except FilexError as exc:
            # A bad object we cannot remove will be taken as a filing: it is followed, and said.
            raise CorruptFiling(
                f"s3://{bucket}/{key} for {self._who()} failed its integrity check ({problem}) and could not "
                f"be deleted ({exc}): fileX may have received a corrupt file"
            ) from exc
        log.warning("deleted s3://%s/%s for %s: %s", bucket, key, self._who(), problem)

    def list_feedback(self) -> list[RemoteFile]:
        loc = self._read_location()

        def run() -> list[RemoteFile]:
            files: list[RemoteFile] = []
            skipped: list[str] = []
            pages = self._s3().get_paginator("list_objects_v2").paginate(
                Bucket=loc.bucket, Prefix=loc.prefix, Delimiter="/"
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(loc.prefix):]
                    if name:
                        files.append(RemoteFile(name=name, size=int(obj.get("Size", 0)),
                                                modified=obj.get("LastModified")))
                skipped.extend(p["Prefix"] for p in page.get("CommonPrefixes", []))
            if skipped:
                # fileX names cannot contain '/': never expected, but never silently ignored either.
                log.warning("feedback for %s: ignoring %d sub-folder(s) of out/: %s", self._who(), len(skipped),
                            ", ".join(skipped[:5]))
            return files

        return self._with_credential_retry("list out/", run)

    def download_feedback(self, name: str, dest: BinaryIO, progress: ProgressFn | None = None) -> int:
        reason = valid_remote_name(name)
        if reason:
            raise PermanentError(f"cannot download {name!r} for {self._who()}: {reason}")
        loc = self._read_location()
        key = loc.prefix + name
        # Credential retry only around the request: once bytes are in dest a retry would duplicate them.
        resp = self._with_credential_retry(f"download of {name}", lambda: self._s3().get_object(Bucket=loc.bucket, Key=key))
        expected = int(resp.get("ContentLength", -1))
        written = 0
        body = resp["Body"]
        try:
            for chunk in body.iter_chunks(_DOWNLOAD_CHUNK):
                dest.write(chunk)
                written += len(chunk)
                if progress:
                    progress(len(chunk))
        except (BotoCoreError, OSError) as exc:
            raise self._map(exc, f"download of {name}") from exc
        finally:
            body.close()
        if expected >= 0 and written != expected:
            raise TransientError(f"S3 download of {name} for {self._who()}: got {written} of {expected} bytes")
        return written

    def find_uploaded(self, remote_name: str) -> RemoteFile | None:
        """HEAD of ``in/remote_name``: its size and LastModified, or None when absent or when these
        credentials may not read ``in/`` (fileX's transfer tokens write ``in/`` but read only
        ``in_arcv/`` and ``out/``: a 403 means "cannot know", not "absent"). Never raises for that."""
        reason = valid_remote_name(remote_name)
        if reason:
            raise PermanentError(f"cannot look up {remote_name!r} for {self._who()}: {reason}")
        loc = self._write_location()
        key = loc.prefix + remote_name
        for attempt in (1, 2):
            try:
                head = self._s3().head_object(Bucket=loc.bucket, Key=key)
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if code in _NOT_FOUND_CODES or status == 404:
                    return None
                if status == 400 and attempt == 1:
                    # HEAD errors have no body: an expired token is a bare 400. Refetch once.
                    self._forget_credentials()
                    continue
                if status in (400, 403) or code in _DENIED_CODES or code in _CREDENTIAL_CODES:
                    log.debug("S3 head of in/%s for %s refused (%s): these credentials cannot read in/; "
                              "presence unknown", remote_name, self._who(), code or status)
                    return None
                raise self._map(exc, f"head of {remote_name}") from exc
            except (BotoCoreError, OSError) as exc:
                raise self._map(exc, f"head of {remote_name}") from exc
            return RemoteFile(name=remote_name, size=int(head.get("ContentLength", 0)),
                              modified=head.get("LastModified"))
        return None

    def close(self) -> None:
        with self._lock:
            client, self._client, self._client_creds = self._client, None, None
        if client is not None:
            client.close()
