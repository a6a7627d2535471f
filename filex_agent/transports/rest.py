"""fileX HTTPS REST transport: ask fileX for a pre-signed S3 URL, then PUT/GET the bytes.

Uploads stream from the file in 1 MiB chunks with an explicit Content-Length (S3 refuses
chunked transfer encoding on pre-signed PUTs), so memory stays flat whatever the file size.
Pre-signed URLs are bearer secrets: only ``redact_url`` forms reach logs and messages.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import re
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import httpx

from filex_agent.api import FilexClient
from filex_agent.config import valid_remote_name
from filex_agent.errors import FilexError, PermanentError, RemoteChangedError, TransientError, UploadUnconfirmed
from filex_agent.http import RetryPolicy, body_excerpt, raise_for_status, redact_url, transport_error
from filex_agent.localfile import LocalFile, open_for_upload
from filex_agent.models import PresignedUrl
from filex_agent.transports import ProgressFn, RemoteFile, Transport, UploadResult, register

log = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024
# Chunks read and hashed ahead of the socket by one helper thread (files of more than one chunk):
# pread and SHA-256 release the GIL, so they run while the previous chunk is being sent instead
# of taking turns with it (a 1 GiB PUT spent ~37% of its time hashing, ~16% reading, in series).
READ_AHEAD = 4
_END = object()
# fileX / FINRA Gateway limit per file.
MAX_UPLOAD_BYTES = 5120 * 1024 * 1024
# S3: 403 AccessDenied "Request has expired", 400 ExpiredToken "The provided token has expired."
_EXPIRED_RE = re.compile(r"request has expired|expiredtoken|token has expired", re.IGNORECASE)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _no_more_retries(exc: TransientError) -> TransientError:
    exc.retries_exhausted = True  # type: ignore[attr-defined]
    return exc


def _is_expired(resp: httpx.Response) -> bool:
    if resp.status_code not in (400, 403):
        return False
    try:
        body = resp.read()[:4096].decode("utf-8", "replace")
    except (httpx.HTTPError, httpx.StreamError):
        return False
    return bool(_EXPIRED_RE.search(body))


@register("rest")
class RestTransport(Transport):
    reports_commit = True  # on_commit before each request that can make the filing

    def __init__(self, org: str, application: str, *, api: FilexClient, http: httpx.Client, retry: RetryPolicy,
                 chunk_size: int = CHUNK_SIZE, max_url_renewals: int = 3,
                 metadata: dict[str, str] | None = None, read_ahead: int = READ_AHEAD):
        super().__init__(org, application)
        self._api = api
        self._http = http
        self._retry = retry
        self.chunk_size = chunk_size
        self.read_ahead = read_ahead  # 0: read and hash in the sending thread
        # How many fresh URLs to ask for when one turns out to be expired, per attempt.
        self.max_url_renewals = max_url_renewals
        # Optional filex-{attr} metadata sent with every upload URL request.
        self.metadata = dict(metadata or {})

    # ------------------------------------------------------------------ upload

    def upload(self, local: LocalFile | Path, remote_name: str, progress: ProgressFn | None = None, *,
               on_commit: Callable[[], None] | None = None,
               on_ticket: Callable[[str], None] | None = None) -> UploadResult:
        reason = valid_remote_name(remote_name)
        if reason:
            raise PermanentError(reason)
        with open_for_upload(local) as lf:
            return self._upload(lf, remote_name, progress, *self._hooks(on_commit, on_ticket))

    def _upload(self, lf: LocalFile, remote_name: str, progress: ProgressFn | None, on_commit: Callable[[], None],
                on_ticket: Callable[[str], None]) -> UploadResult:
        size = lf.size
        if size > MAX_UPLOAD_BYTES:
            raise PermanentError(f"{lf.name} is {size} bytes; fileX accepts at most 5120 MB per file")
        started = _now()
        tracking_ids: list[str] = []

        def attempt() -> tuple[PresignedUrl, httpx.Response, str]:
            for n in range(self.max_url_renewals + 1):
                presigned = self._api.upload_url(self.org, self.application, remote_name, self.metadata or None)
                if presigned.trackingId:
                    tracking_ids.append(presigned.trackingId)
                    on_ticket(presigned.trackingId)
                put = self._put(lf, presigned, progress, on_commit)
                if put is not None:
                    return presigned, put[0], put[1]
                log.warning("pre-signed upload URL for %s/%s expired (%s); requesting a new one (%d/%d)",
                            self.upload_location, remote_name, redact_url(presigned.url), n + 1,
                            self.max_url_renewals)
            raise _no_more_retries(TransientError(
                f"upload of {remote_name}: pre-signed URL expired {self.max_url_renewals + 1} times in a row"))

        try:
            presigned, resp, sent_sha256 = self._retry.call(f"upload {self.upload_location}/{remote_name}", attempt)
        except FilexError as exc:
            # Every tracking id handed out; the caller reconciles the ones whose PUT may have landed.
            exc.tracking_ids = list(tracking_ids)  # type: ignore[attr-defined]
            raise
        detail: dict[str, str] = {}
        if resp.headers.get("ETag"):
            detail["etag"] = resp.headers["ETag"].strip('"')
        earlier = [t for t in tracking_ids if t != presigned.trackingId]
        if earlier:
            detail["abandoned_tracking_ids"] = ",".join(earlier)
        log.info("uploaded %s to %s/%s (%d bytes, tracking id %s)", lf.name, self.upload_location,
                 remote_name, size, presigned.trackingId)
        return UploadResult(remote_name=remote_name, upload_location=self.upload_location, size=size,
                            started_at=started, finished_at=_now(), tracking_id=presigned.trackingId,
                            detail=detail, sent_sha256=sent_sha256)

    def _put(self, lf: LocalFile, presigned: PresignedUrl, progress: ProgressFn | None,
             on_commit: Callable[[], None]) -> tuple[httpx.Response, str] | None:
        """PUT the file to the URL: (response, SHA-256 of the body sent), or None if the URL had expired.

        The outcome is unknown once the whole body was handed over and no answer came back (or a
        5xx did: S3 may have stored it first): that raises ``UploadUnconfirmed`` and is never
        sent again here. A refusal (4xx) or a failure before the last byte proves nothing was
        stored (S3 stores no object from a body shorter than its Content-Length): retryable.
        """
        what = f"upload to {redact_url(presigned.url)}"
        size = lf.size
        if lf.changed():
            raise _no_more_retries(RemoteChangedError(f"{lf.name} changed before upload"))
        sent = [0]
        digest = hashlib.sha256()
        body = self._chunks(lf, sent, digest, progress)
        on_commit()
        try:
            resp = self._http.put(presigned.url, content=body, headers={"Content-Length": str(size)})
        except httpx.HTTPError as exc:
            # A connect failure comes before any byte; anything else after the last byte is unknown.
            if sent[0] == size and not isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
                raise self._unconfirmed(presigned, f"{what}: {type(exc).__name__} after the whole body was sent") from None
            # from None: the chained httpx error carries the request (and its signed URL).
            raise transport_error(exc, what) from None
        finally:
            body.close()  # however the request ended: stops and joins the read-ahead thread
        if resp.is_success:
            if sent[0] != size:  # a server that answered before reading the whole body
                raise _no_more_retries(TransientError(
                    f"{what}: HTTP {resp.status_code} after only {sent[0]} of {size} bytes"))
            return resp, digest.hexdigest()
        if _is_expired(resp):
            return None
        if resp.status_code >= 500 and sent[0] == size:
            raise self._unconfirmed(presigned, f"{what}: HTTP {resp.status_code} after the whole body was sent")
        if resp.status_code == 403:
            # A signature/permission refusal by S3 is not fileX entitlement; a new URL won't help.
            raise PermanentError(f"{what}: S3 refused the upload: HTTP 403 {body_excerpt(resp)}".rstrip())
        raise_for_status(resp, what)
        raise PermanentError(f"{what}: unexpected HTTP {resp.status_code}")  # 1xx/3xx

    @staticmethod
    def _unconfirmed(presigned: PresignedUrl, message: str) -> UploadUnconfirmed:
        log.warning("%s; fileX may have the file: not sending it again (tracking id %s)", message,
                    presigned.trackingId)
        exc = UploadUnconfirmed(f"{message}; fileX may have stored it",
                                tracking_id=presigned.trackingId)
        exc.retries_exhausted = True  # type: ignore[attr-defined]
        return exc

    def _chunks(self, lf: LocalFile, sent: list[int], digest: "hashlib._Hash", progress: ProgressFn | None,
                ) -> Iterator[bytes]:
        """The body: the file's chunks, each hashed into ``digest`` before it is handed to httpx.

        Every chunk hashed is one sent: the digest is only read once the whole body went out.
        """
        size = lf.size
        blocks = self._hashed_blocks(lf, digest)
        try:
            for chunk in blocks:
                if sent[0] + len(chunk) == size and lf.changed():
                    # Checked before the last bytes go out: aborting now leaves S3 without an object.
                    raise _no_more_retries(RemoteChangedError(f"{lf.name} changed during upload"))
                sent[0] += len(chunk)
                if progress is not None:
                    progress(len(chunk))
                yield chunk
        finally:
            blocks.close()
        if sent[0] != size:
            raise _no_more_retries(RemoteChangedError(f"{lf.name} shrank during upload"))

    def _hashed_blocks(self, lf: LocalFile, digest: "hashlib._Hash") -> Iterator[bytes]:
        if self.read_ahead < 1 or lf.size <= self.chunk_size:
            for chunk in lf.blocks(self.chunk_size):
                digest.update(chunk)
                yield chunk
            return
        # One thread reads and hashes up to ``read_ahead`` chunks ahead; it is stopped and joined
        # whenever the body ends, however it ends (the generator's close runs this finally).
        ready: queue.Queue[object] = queue.Queue(self.read_ahead)
        stop = threading.Event()

        def hand_over(item: object) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.5)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for chunk in lf.blocks(self.chunk_size):
                    if stop.is_set():
                        return
                    digest.update(chunk)
                    if not hand_over(chunk):
                        return
                hand_over(_END)
            except BaseException as exc:  # noqa: BLE001 - raised again in the sending thread
                hand_over(exc)

        worker = threading.Thread(target=produce, name=f"rest-read {lf.name}", daemon=True)
        worker.start()
        try:
            while True:
                item = ready.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            stop.set()
            while True:  # make room: a producer blocked on a full queue sees ``stop`` at once
                try:
                    ready.get_nowait()
                except queue.Empty:
                    break
            worker.join()

    # ------------------------------------------------------------------ feedback

    def list_feedback(self) -> list[RemoteFile]:
        listing = self._api.list_files(self.org, self.application, "out")
        return [RemoteFile(name=e.name, size=e.metadata.contentLength, modified=e.metadata.lastModified)
                for e in listing.children if e.is_file]

    def download_feedback(self, name: str, dest: BinaryIO, progress: ProgressFn | None = None) -> int:
        try:
            start: int | None = dest.tell() if dest.seekable() else None
        except OSError:
            start = None
        written = [0]

        def attempt() -> int:
            if written[0]:
                if start is None:
                    raise _no_more_retries(TransientError(f"download of out/{name} interrupted"))
                dest.seek(start)
                dest.truncate()
                written[0] = 0
            for _ in range(self.max_url_renewals + 1):
                presigned = self._api.download_url(self.org, self.application, "out", name)
                done = self._get(presigned, name, dest, progress, written)
                if done is not None:
                    return done
                log.warning("pre-signed download URL for out/%s expired (%s); requesting a new one",
                            name, redact_url(presigned.url))
            raise _no_more_retries(TransientError(f"download of out/{name}: pre-signed URL kept expiring"))

        return self._retry.call(f"download {self.org}/{self.application}/out/{name}", attempt)

    def _get(self, presigned: PresignedUrl, name: str, dest: BinaryIO, progress: ProgressFn | None,
             written: list[int]) -> int | None:
        what = f"download of out/{name} from {redact_url(presigned.url)}"
        try:
            with self._http.stream("GET", presigned.url, follow_redirects=False) as resp:  # never to another host
                if not resp.is_success:
                    resp.read()
                    if _is_expired(resp):
                        return None
                    raise_for_status(resp, what)
                    raise PermanentError(f"{what}: unexpected HTTP {resp.status_code}")
                expected = resp.headers.get("Content-Length")
                # iter_raw: the object's bytes exactly as stored, whatever its Content-Encoding.
                for chunk in resp.iter_raw(self.chunk_size):
                    dest.write(chunk)
                    written[0] += len(chunk)
                    if progress is not None:
                        progress(len(chunk))
        except httpx.HTTPError as exc:
            raise transport_error(exc, what) from None
        if expected is not None and expected.isdigit() and int(expected) != written[0]:
            raise TransientError(f"{what}: got {written[0]} of {expected} bytes")
        return written[0]

    def find_uploaded(self, remote_name: str) -> RemoteFile | None:
        # REST uploads are found through their tracking ids, not by listing ``in``.
        return None

