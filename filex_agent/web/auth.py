"""Authentication of the status page: a bearer token and/or an HTTP Basic password hash.

The hash format is ``pbkdf2_sha256$ITERATIONS$SALT$HASH`` (salt and hash base64), made by
``python -m filex_agent.web.password``. Verified credentials are remembered (by their SHA-256)
so a page that refreshes every few seconds does not cost a PBKDF2 run each time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import threading

from filex_agent.errors import ConfigError

SCHEME = "pbkdf2_sha256"
ITERATIONS = 600_000  # OWASP's figure for PBKDF2-HMAC-SHA256


def hash_password(password: str, *, iterations: int = ITERATIONS, salt: bytes | None = None) -> str:
    salt = salt if salt is not None else os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    return f"{SCHEME}${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def _parse_hash(value: str) -> tuple[int, bytes, bytes]:
    try:
        scheme, iterations, salt, digest = value.split("$")
        if scheme != SCHEME:
            raise ValueError
        return int(iterations), base64.b64decode(salt, validate=True), base64.b64decode(digest, validate=True)
    except (ValueError, binascii.Error):
        # Never echo the value.
        raise ConfigError("web.password_hash", f"not a {SCHEME}$ITERATIONS$SALT$HASH value "
                          "(make one with `python -m filex_agent.web.password`)") from None


class Authenticator:
    def __init__(self, *, token: str | None = None, password_hash: str | None = None, username: str = "compliance"):
        if not token and not password_hash:
            raise ValueError("an Authenticator needs a token or a password hash")
        self._token = token.encode("utf-8") if token else None
        self._hash = _parse_hash(password_hash) if password_hash else None
        self._username = username
        self._ok: set[bytes] = set()
        self._lock = threading.Lock()

    def check(self, header: str | None) -> bool:
        """True if an ``Authorization`` header value carries valid credentials."""
        if not header:
            return False
        key = hashlib.sha256(header.encode("utf-8", "surrogateescape")).digest()
        with self._lock:
            if key in self._ok:
                return True
        ok = self._verify(header)
        if ok:
            with self._lock:
                if len(self._ok) > 64:
                    self._ok.clear()
                self._ok.add(key)
        return ok

    def _verify(self, header: str) -> bool:
        kind, _, value = header.strip().partition(" ")
        value = value.strip()
        if kind.lower() == "bearer":
            return self._token is not None and hmac.compare_digest(value.encode("utf-8", "surrogateescape"), self._token)
        if kind.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (ValueError, binascii.Error, UnicodeDecodeError):
            return False
        if not sep:
            return False
        pw = password.encode("utf-8")
        if self._token is not None and hmac.compare_digest(pw, self._token):
            return True
        if self._hash is not None and hmac.compare_digest(user.encode("utf-8"), self._username.encode("utf-8")):
            iterations, salt, digest = self._hash
            return hmac.compare_digest(hashlib.pbkdf2_hmac("sha256", pw, salt, iterations), digest)
        return False
