"""Typed client of the fileX REST API (``/files``, ``/tracking``, ``/S3TransferTokens``)."""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Callable, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from filex_agent.auth import FipTokenProvider
from filex_agent.errors import PermanentError
from filex_agent.http import HttpTransientError, RateLimiter, RetryPolicy, raise_for_status, redact_text, redact_url
from filex_agent.models import Listing, PresignedUrl, S3TransferTokens, TrackingRecord

log = logging.getLogger(__name__)

M = TypeVar("M")

_TRACKING_LIST = TypeAdapter(list[TrackingRecord])
# RFC 3986 pchar minus "/": fileX names use : ! @ , & - = ' _ . which need no escaping in a path.
_SEGMENT_SAFE = ":@!$&'()*,;="
_META_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9\-]*$")
_META_VALUE_RE = re.compile(r"^[A-Za-z0-9!@,&\-=' _.:]*$")


def _segment(value: str, what: str) -> str:
    if not value or value in (".", "..") or "/" in value:
        raise PermanentError(f"invalid {what} for a fileX path: {value!r}")
    return quote(value, safe=_SEGMENT_SAFE)


class FilexClient:
    """One fileX API credential. Every call: rate limit → bearer token → request, retried by the
    RetryPolicy; a 401 drops the token and retries once with a fresh one."""

    def __init__(self, base_url: str, tokens: FipTokenProvider, *, http: httpx.Client, retry: RetryPolicy,
                 limiter: RateLimiter | None = None, allow_insecure: bool = False):
        self.base_url = base_url.rstrip("/")
        self._allow_insecure = allow_insecure
        self._tokens = tokens
        self._http = http
        self._retry = retry
        self._limiter = limiter

    def __repr__(self) -> str:
        return f"FilexClient(base_url={self.base_url!r}, tokens={self._tokens!r})"

    # ------------------------------------------------------------------ endpoints

    def applications(self, org: str) -> Listing:
        return self._call("GET", ["files", (org, "org")], Listing, f"list applications of org {org}")

    def subspaces(self, org: str, app: str) -> Listing:
        return self._call("GET", ["files", (org, "org"), (app, "application")], Listing,
                          f"list sub-spaces of {org}/{app}")

    def list_files(self, org: str, app: str, sub: str) -> Listing:
        return self._call("GET", ["files", (org, "org"), (app, "application"), (sub, "sub-space")], Listing,
                          f"list {org}/{app}/{sub}")

    def download_url(self, org: str, app: str, sub: str, name: str) -> PresignedUrl:
        what = f"download URL for {org}/{app}/{sub}/{name}"
        return self._https_only(self._call("GET", ["files", (org, "org"), (app, "application"), (sub, "sub-space"),
                                                   (name, "file name")], PresignedUrl, what), what)

    def upload_url(self, org: str, app: str, name: str, metadata: dict[str, str] | None = None) -> PresignedUrl:
        headers: dict[str, str] = {}
        for key, value in (metadata or {}).items():
            if not _META_NAME_RE.match(key):
                raise PermanentError(f"invalid fileX metadata name {key!r}")
            if not _META_VALUE_RE.match(value):
                raise PermanentError(f"invalid characters in fileX metadata {key!r}")
            headers[key if key.lower().startswith("filex-") else f"filex-{key}"] = value
        what = f"upload URL for {org}/{app}/in/{name}"
        return self._https_only(self._call("PUT", ["files", (org, "org"), (app, "application"), "in",
                                                   (name, "file name")], PresignedUrl, what, headers=headers), what)

    def tracking(self, tracking_id: str | None = None) -> list[TrackingRecord]:
        params = {"id": tracking_id} if tracking_id else None
        what = f"tracking {tracking_id}" if tracking_id else "tracking (last 90 days)"
        return self._call("GET", ["tracking"], _parse_tracking, what, params=params)

    def s3_transfer_tokens(self, org: str, app: str) -> S3TransferTokens:
        return self._call("GET", ["S3TransferTokens", (org, "org"), (app, "application")], S3TransferTokens,
                          f"S3 transfer tokens for {org}/{app}")

    # ------------------------------------------------------------------ plumbing

    def _https_only(self, presigned: PresignedUrl, what: str) -> PresignedUrl:
        """A pre-signed URL carries the filing (or FINRA's feedback): never over plain http, whatever
        a misconfigured or hostile server answers (only a test server may, with allow_insecure)."""
        if not self._allow_insecure and httpx.URL(presigned.url).scheme != "https":
            raise PermanentError(f"fileX {what}: the pre-signed URL is not https ({redact_url(presigned.url)}); "
                                 "refused, nothing was sent over it")
        return presigned

    def _url(self, parts: list[Any]) -> str:
        segs = [p if isinstance(p, str) else _segment(*p) for p in parts]
        return self.base_url + "/" + "/".join(segs)

    def _call(self, method: str, parts: list[Any], model: type[BaseModel] | Callable[[Any], Any], what: str, *,
              params: dict[str, str] | None = None, headers: dict[str, str] | None = None) -> Any:
        url = self._url(parts)  # validated before any network use

        def attempt() -> Any:
            for auth_try in range(2):
                token = self._tokens.token()
                if self._limiter is not None:
                    self._limiter.acquire()
                resp = self._http.request(method, url, params=params, headers={
                    "Accept": "application/json", "Authorization": f"Bearer {token}", **(headers or {})})
                if resp.status_code == 401 and auth_try == 0:
                    log.info("fileX answered 401 to %s; refreshing the token once", what)
                    self._tokens.invalidate(token)
                    continue
                try:
                    raise_for_status(resp, f"fileX {what}")
                except HttpTransientError as exc:
                    if exc.retry_after is not None and self._limiter is not None:
                        # The limit is per IP: every request to fileX waits, not only this one.
                        self._limiter.pause(exc.retry_after)
                    raise
                return _parse(resp, model, what)
            raise AssertionError("unreachable")  # pragma: no cover

        return self._retry.call(f"fileX {what}", attempt)


def _parse_tracking(data: Any) -> list[TrackingRecord]:
    # The docs show a list; tolerate a single object too.
    if isinstance(data, dict):
        data = [data]
    return _TRACKING_LIST.validate_python(data)


def _parse(resp: httpx.Response, model: type[BaseModel] | Callable[[Any], Any], what: str) -> Any:
    try:
        data = json.loads(resp.content)
    except ValueError:
        excerpt = " ".join(redact_text(resp.content[:200].decode("utf-8", "replace"), tokens=True).split())
        raise PermanentError(f"unexpected response from fileX {what} (not JSON): {excerpt[:120]!r}") from None
    try:
        if isinstance(model, type) and issubclass(model, BaseModel):
            return model.model_validate(data)
        return model(data)
    except ValidationError as exc:
        # Name the fields, never echo values: the body may hold a URL signature or an S3 secret key.
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['type']}"
                             for e in exc.errors()[:3])
        raise PermanentError(f"unexpected response from fileX {what} (not the documented shape): "
                             f"{problems}") from None
