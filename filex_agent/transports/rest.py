"""fileX HTTPS REST transport: ask fileX for a pre-signed S3 URL, then PUT/GET the bytes.

Uploads stream from the file in 1 MiB chunks with an explicit Content-Length (S3 refuses
chunked transfer encoding on pre-signed PUTs), so memory stays flat whatever the file size.
Pre-signed URLs are bearer secrets: only ``redact_url`` forms reach logs and messages.
"""

from __future__ import annotations

import logging
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Iterator

import httpx

from filex_agent.api import FilexClient
from filex_agent.config import valid_remote_name
from filex_agent.errors import FilexError, PermanentError, RemoteChangedError, TransientError
from filex_agent.http import RetryPolicy, body_excerpt, raise_for_status, redact_url, transport_error
from filex_agent.models import PresignedUrl
from filex_agent.transports import ProgressFn, RemoteFile, Transport, UploadResult, register

log = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024
# fileX / FINRA Gateway limit per file.
MAX_UPLOAD_BYTES = 5120 * 1024 * 1024
# S3: 403 AccessDenied "Request has expired", 400 ExpiredToken "The provided token has expired."
_EXPIRED_RE = re.compile(r"request has expired|expiredtoken|token has expired", re.IGNORECASE)
_RECEIVED = "received by finra"


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
    def __init__(self, org: str, application: str, *, api: FilexClient, http: httpx.Client, retry: RetryPolicy,
                 chunk_size: int = CHUNK_SIZE, max_url_renewals: int = 3,
                 metadata: dict[str, str] | None = None):
        super().__init__(org, application)
        self._api = api
        self._http = http
        self._retry = retry
        self.chunk_size = chunk_size
        # How many fresh URLs to ask for when one turns out to be expired, per attempt.
        self.max_url_renewals = max_url_renewals
        # Optional filex-{attr} metadata sent with every upload URL request.
        self.metadata = dict(metadata or {})

    # ------------------------------------------------------------------ upload

    def upload(self, local: Path, remote_name: str, progress: ProgressFn | None = None) -> UploadResult:
        reason = valid_remote_name(remote_name)
        if reason:
            raise PermanentError(reason)
        try:
            size = local.stat().st_size
        except OSError as exc:
            raise PermanentError(f"cannot read {local}: {exc.strerror}") from None
        if size > MAX_UPLOAD_BYTES:
            raise PermanentError(f"{local.name} is {size} bytes; fileX accepts at most 5120 MB per file")
        started = _now()
        tracking_ids: list[str] = []
        # Tracking id of an attempt whose bytes may have landed although we saw an error.
        ambiguous: list[str] = []

        def attempt() -> tuple[PresignedUrl, httpx.Response | None]:
            if ambiguous:
                confirmed = self._confirm_received(ambiguous.pop())
                if confirmed is not None:
                    return confirmed, None
            for n in range(self.max_url_renewals + 1):
                presigned = self._api.upload_url(self.org, self.application, remote_name, self.metadata or None)
                if presigned.trackingId:
                    tracking_ids.append(presigned.trackingId)
                    if self.on_ticket is not None:
                        self.on_ticket(presigned.trackingId)
                resp = self._put(local, size, presigned, progress, ambiguous)
                if resp is not None:
                    return presigned, resp
                log.warning("pre-signed upload URL for %s/%s expired (%s); requesting a new one (%d/%d)",
                            self.upload_location, remote_name, redact_url(presigned.url), n + 1,
                            self.max_url_renewals)
            raise _no_more_retries(TransientError(
                f"upload of {remote_name}: pre-signed URL expired {self.max_url_renewals + 1} times in a row"))

        try:
            presigned, resp = self._retry.call(f"upload {self.upload_location}/{remote_name}", attempt)
        except FilexError as exc:
            confirmed = self._confirm_received(ambiguous.pop()) if ambiguous else None
            if confirmed is None:
                # Orphaned "Request Received" tracking ids: the caller may want to reconcile them.
                exc.tracking_ids = list(tracking_ids)  # type: ignore[attr-defined]
                raise
            presigned, resp = confirmed, None
        detail: dict[str, str] = {}
        if resp is not None and resp.headers.get("ETag"):
            detail["etag"] = resp.headers["ETag"].strip('"')
        if resp is None:
            detail["confirmed_by"] = "tracking"
        earlier = [t for t in tracking_ids if t != presigned.trackingId]
        if earlier:
            detail["abandoned_tracking_ids"] = ",".join(earlier)
        log.info("uploaded %s to %s/%s (%d bytes, tracking id %s)", local.name, self.upload_location,
                 remote_name, size, presigned.trackingId)
        return UploadResult(remote_name=remote_name, upload_location=self.upload_location, size=size,
                            started_at=started, finished_at=_now(), tracking_id=presigned.trackingId,
                            detail=detail)

    def _put(self, local: Path, size: int, presigned: PresignedUrl, progress: ProgressFn | None,
             ambiguous: list[str]) -> httpx.Response | None:
        """PUT the file to the URL; the response, or None if the URL had expired."""
        what = f"upload to {redact_url(presigned.url)}"
        sent = [0]
        try:
            f = open(local, "rb")
        except OSError as exc:
            raise PermanentError(f"cannot read {local}: {exc.strerror}") from None
        with f:
            st = os.fstat(f.fileno())
            if st.st_size != size:
                raise _no_more_retries(RemoteChangedError(f"{local.name} changed size before upload"))
            body = self._chunks(f, size, st.st_mtime_ns, sent, progress, local.name)
            try:
                resp = self._http.put(presigned.url, content=body, headers={"Content-Length": str(size)})
            except httpx.HTTPError as exc:
                if sent[0] == size and presigned.trackingId and not isinstance(
                        exc, (httpx.ConnectError, httpx.ConnectTimeout)):
                    ambiguous.append(presigned.trackingId)
                # from None: the chained httpx error carries the request (and its signed URL).
                raise transport_error(exc, what) from None
        if resp.is_success:
            return resp
        if _is_expired(resp):
            return None
        if resp.status_code >= 500 and sent[0] == size and presigned.trackingId:
            ambiguous.append(presigned.trackingId)
        if resp.status_code == 403:
            # A signature/permission refusal by S3 is not fileX entitlement; a new URL won't help.
            raise PermanentError(f"{what}: S3 refused the upload: HTTP 403 {body_excerpt(resp)}".rstrip())
        raise_for_status(resp, what)
        raise PermanentError(f"{what}: unexpected HTTP {resp.status_code}")  # 1xx/3xx

    def _chunks(self, f: BinaryIO, size: int, mtime_ns: int, sent: list[int], progress: ProgressFn | None,
                name: str) -> Iterator[bytes]:
        remaining = size
        while remaining > 0:
            chunk = f.read(min(self.chunk_size, remaining))
            if not chunk:
                raise _no_more_retries(RemoteChangedError(f"{name} shrank during upload"))
            remaining -= len(chunk)
            if remaining == 0:
                # Checked before the last bytes go out: aborting now leaves S3 without an object.
                st = os.fstat(f.fileno())
                if st.st_size != size or st.st_mtime_ns != mtime_ns:
                    raise _no_more_retries(RemoteChangedError(f"{name} changed during upload"))
            sent[0] += len(chunk)
            if progress is not None:
                progress(len(chunk))
            yield chunk

    def _confirm_received(self, tracking_id: str) -> PresignedUrl | None:
        """Did the bytes of an attempt that looked failed arrive after all? Guards against a
        second filing of the same file under a new tracking id."""
        try:
            records = self._api.tracking(tracking_id)
        except FilexError as exc:
            log.warning("could not check tracking id %s before retrying the upload: %s", tracking_id, exc)
            return None
        for rec in records:
            if rec.trackingId == tracking_id and (
                    (rec.status or "").lower() == _RECEIVED or rec.downstreamStatus):
                log.info("tracking id %s shows the bytes arrived; not uploading again", tracking_id)
                return PresignedUrl(url="", trackingId=tracking_id)
        return None

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

