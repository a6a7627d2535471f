"""Fixes to moto that the sandbox needs to behave like S3.

``FakeKey.etag`` (moto 5.x) is computed lazily, on first use, by seeking the key's shared
``_value_buffer`` to 0 and reading it in 16 MiB blocks, WITHOUT the key's lock (``value`` takes
it). Two threads that need the ETag of a new key at the same time (the PutObject answer and the
sandbox processor's ListObjectsV2 of ``in/``, or a HEAD) move each other's file position: each
hashes an interleaving of blocks, and the wrong digest is cached for good. A key above one block
(16 MiB) and a loaded machine (a slower hash, a wider window) make it likely: the agent then
sees a PutObject ETag that is not the MD5 of the bytes it sent (issue 11: a 48 MiB single PUT
"failed the integrity check", the bytes stored were intact). Real S3 computes the ETag once, at
write time. ``apply()`` makes moto compute it under the key's lock.
"""

from __future__ import annotations

import hashlib
import threading

from moto.s3.models import FakeKey

_BLOCK = 16 * 1024 * 1024
_applied = threading.Lock()


def _locked_etag(self: FakeKey) -> str:
    with self.lock:
        if self._etag is None:
            md5 = hashlib.md5(usedforsecurity=False)
            self._value_buffer.seek(0)
            while block := self._value_buffer.read(_BLOCK):
                md5.update(block)
            self._etag = md5.hexdigest()
    return f'"{self._etag}"'


def apply() -> None:
    """Idempotent; process-wide (moto's S3 backend is process-wide too)."""
    with _applied:
        if getattr(FakeKey.etag, "fget", None) is not _locked_etag:
            FakeKey.etag = property(_locked_etag)  # type: ignore[assignment, method-assign]
