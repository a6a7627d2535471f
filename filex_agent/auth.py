"""FIP OAuth2 client-credentials: one cached bearer token per API credential."""

from __future__ import annotations

import base64
import logging
import threading
import time
from typing import Callable

import httpx
from pydantic import ValidationError

from filex_agent.errors import CredentialsRefused, PermanentError
from filex_agent.http import RetryPolicy, body_excerpt, raise_for_status
from filex_agent.models import TokenResponse

log = logging.getLogger(__name__)


class FipTokenProvider:
    """Fetches and caches a FIP access token; thread-safe, concurrent callers share one fetch.

    The token is kept for ``min(expires_in - refresh_margin, max_cache_seconds)``: FINRA's guidance
    is to refresh before expiry or to cache for 30 minutes.
    """

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: str,
        *,
        http: httpx.Client,
        retry: RetryPolicy,
        refresh_margin: float = 120.0,
        max_cache_seconds: float = 1800.0,
        clock: Callable[[], float] = time.time,
    ):
        self.token_url = token_url
        self.client_id = client_id
        self.__basic = "Basic " + base64.b64encode(f"{client_id}:{client_secret}".encode()).decode("ascii")
        self._http = http
        self._retry = retry
        self.refresh_margin = refresh_margin
        self.max_cache_seconds = max_cache_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self.__token: str | None = None
        self._expires_at = 0.0
        self.refreshes = 0

    def __repr__(self) -> str:
        return f"FipTokenProvider(token_url={self.token_url!r}, client_id={self.client_id!r})"

    def token(self) -> str:
        # The lock is held across the fetch on purpose: callers arriving meanwhile wait and reuse it.
        with self._lock:
            if self.__token is not None and self._clock() < self._expires_at:
                return self.__token
            parsed = self._retry.call("FIP access token", self._fetch)
            lifetime = min(parsed.expires_in - self.refresh_margin, self.max_cache_seconds)
            if lifetime <= 0:
                # A token shorter-lived than the margin: use half of its life.
                lifetime = parsed.expires_in / 2
            self.__token = parsed.access_token
            self._expires_at = self._clock() + lifetime
            self.refreshes += 1
            log.debug("FIP token for %s fetched; cached %.0fs", self.client_id, lifetime)
            return self.__token

    def invalidate(self, token: str) -> None:
        """After a 401: forget ``token`` if it is still the cached one (another thread may have
        refreshed already)."""
        with self._lock:
            if self.__token is not None and self.__token == token:
                self.__token = None
                self._expires_at = 0.0

    def _fetch(self) -> TokenResponse:
        resp = self._http.post(
            self.token_url,
            params={"grant_type": "client_credentials"},
            headers={"Authorization": self.__basic, "Accept": "application/json"},
        )
        what = f"FIP token for API credential {self.client_id!r}"
        if resp.status_code in (400, 401, 403):
            excerpt = body_excerpt(resp)
            raise CredentialsRefused(f"{what} refused: HTTP {resp.status_code}" + (f" {excerpt}" if excerpt else ""))
        raise_for_status(resp, what)
        try:
            return TokenResponse.model_validate_json(resp.content)
        except ValidationError:
            # Never echo the body: it may hold a token.
            raise PermanentError(f"unexpected response from FIP for {what}: not a token response "
                                 f"(HTTP {resp.status_code}, {len(resp.content)} bytes)") from None
