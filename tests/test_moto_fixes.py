"""moto's lazy ETag under concurrency (issue 11: a 48 MiB PUT "failed the integrity check")."""

from __future__ import annotations

import hashlib
import os
import threading

from moto.s3.models import FakeKey

from filex_agent.sandbox import moto_fixes


def _etags_computed_concurrently(data: bytes, threads: int = 3) -> list[str]:
    key = FakeKey("0001/app1/in/big.bin", data, account_id="123456789012", region_name="us-east-1")
    try:
        key._etag = None  # as a new key: computed on first use
        out: list[str] = []
        start = threading.Barrier(threads)

        def use() -> None:
            start.wait()
            out.append(key.etag.strip('"'))

        ts = [threading.Thread(target=use) for _ in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        out.append(key.etag.strip('"'))  # what is cached for every later request
        return out
    finally:
        key.dispose()


def test_concurrent_etag_of_a_big_key_is_the_md5_of_its_bytes() -> None:
    moto_fixes.apply()
    data = os.urandom(48 * 1024 * 1024)  # three of moto's 16 MiB hashing blocks
    want = hashlib.md5(data).hexdigest()
    for _ in range(3):
        assert set(_etags_computed_concurrently(data)) == {want}


def test_apply_is_idempotent() -> None:
    moto_fixes.apply()
    prop = FakeKey.etag
    moto_fixes.apply()
    assert FakeKey.etag is prop
